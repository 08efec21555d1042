"""Command line: start-up and commands only (serve, validate, schema, dev-token)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from sidecar import __version__

log = logging.getLogger("stepup")

ENV_PREFIX = "STEPUP_"


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_bool(name: str, default: bool) -> bool:
    v = os.environ.get(ENV_PREFIX + name)
    if v is None:
        return default
    return v.strip().lower() in ("1", "true", "yes", "on")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stepup-sidecar",
        description="Envoy ext_authz sidecar: allow, deny or ask for step-up authentication (RFC 9470).",
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="serve Authorization/Check, Explain, health and reflection",
        description="Every flag can also be set by the environment variable shown.",
    )
    s.add_argument("--policy", default=_env("POLICY", ""), help="policy YAML file [STEPUP_POLICY]")
    s.add_argument(
        "--listen",
        default=_env("LISTEN", "127.0.0.1:9191"),
        help="gRPC address HOST:PORT [STEPUP_LISTEN] (default 127.0.0.1:9191)",
    )
    s.add_argument(
        "--health-listen",
        default=_env("HEALTH_LISTEN", ""),
        help="extra address serving only grpc.health.v1 (for kubelet gRPC probes, which dial the pod IP),"
        " off when empty [STEPUP_HEALTH_LISTEN]",
    )
    s.add_argument(
        "--metrics-listen",
        default=_env("METRICS_LISTEN", ""),
        help="Prometheus /metrics address HOST:PORT, off when empty [STEPUP_METRICS_LISTEN]",
    )
    s.add_argument(
        "--explain",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("EXPLAIN", True),
        help="serve the Explain service (it reveals policy details) [STEPUP_EXPLAIN] (default on)",
    )
    s.add_argument(
        "--decision-log",
        choices=["stdout", "stderr", "off"],
        default=_env("DECISION_LOG", "stdout"),
        help="where JSON decision lines go [STEPUP_DECISION_LOG] (default stdout)",
    )
    s.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), help="[STEPUP_LOG_LEVEL] (default info)")
    s.add_argument(
        "--watch-interval",
        type=float,
        default=float(_env("WATCH_INTERVAL", "2")),
        help="seconds between policy file checks, 0 disables [STEPUP_WATCH_INTERVAL] (default 2)",
    )
    s.add_argument(
        "--drain-delay",
        type=float,
        default=float(_env("DRAIN_DELAY", "1")),
        help="on SIGTERM, seconds to keep answering while health reports NOT_SERVING, before new calls"
        " are refused (callers and probes notice first) [STEPUP_DRAIN_DELAY] (default 1; SIGINT skips it)",
    )
    s.add_argument(
        "--shutdown-grace",
        type=float,
        default=float(_env("SHUTDOWN_GRACE", "10")),
        help="seconds in-flight calls may take after SIGTERM [STEPUP_SHUTDOWN_GRACE] (default 10)",
    )

    v = sub.add_parser("validate", help="check policy files; exit 1 on any problem")
    v.add_argument("files", nargs="+")

    sub.add_parser("schema", help="print the policy's JSON Schema")

    t = sub.add_parser(
        "dev-token", help="mint a token with the example development key (for demos and tests)"
    )
    t.add_argument("--key", default="examples/keys/dev-private-jwk.json", help="private JWK file")
    t.add_argument("--issuer", default="https://idp.example.test")
    t.add_argument("--audience", default="bank-api")
    t.add_argument("--sub", default="alice")
    t.add_argument("--roles", default="", help="comma-separated")
    t.add_argument("--scope", default="", help="space-separated")
    t.add_argument("--acr", default="")
    t.add_argument("--amr", default="", help="comma-separated, e.g. pwd,otp")
    t.add_argument("--auth-age", type=int, default=0, help="seconds since authentication (auth_time)")
    t.add_argument("--ttl", type=int, default=600, help="seconds until exp")
    t.add_argument(
        "--allow-any-key", action="store_true", help="sign with a key that is not the example development key"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args.files)
    if args.command == "schema":
        from sidecar.policyfile import schema

        print(json.dumps(schema(), indent=2))
        return 0
    if args.command == "dev-token":
        return _dev_token(args)
    from sidecar.app import serve

    return serve(args)


def _validate(files: list[str]) -> int:
    from sidecar.compiler import PolicyError, load_policy

    failed = False
    for f in files:
        try:
            p = load_policy(f)
        except PolicyError as e:
            failed = True
            for problem in e.problems:
                print(problem, file=sys.stderr)
            continue
        for w in p.warnings:
            print(f"{f}: warning: {w}", file=sys.stderr)
        print(f"{f}: ok ({p.version})")
    return 1 if failed else 0


def _dev_token(args: argparse.Namespace) -> int:
    from joserfc import jwt
    from joserfc.jwk import import_key

    data = json.loads(Path(args.key).read_text())
    if data.get("kid", "").startswith("dev-") is False and not args.allow_any_key:
        print("refusing: this is not the example development key (use --allow-any-key)", file=sys.stderr)
        return 2
    key = import_key(data)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": args.issuer,
        "aud": args.audience,
        "sub": args.sub,
        "iat": now,
        "exp": now + args.ttl,
        "auth_time": now - args.auth_age,
    }
    if args.roles:
        claims["roles"] = [r for r in args.roles.split(",") if r]
    if args.scope:
        claims["scope"] = args.scope
    if args.acr:
        claims["acr"] = args.acr
    if args.amr:
        claims["amr"] = [m for m in args.amr.split(",") if m]
    print(jwt.encode({"alg": data.get("alg", "RS256"), "kid": data["kid"], "typ": "JWT"}, claims, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
