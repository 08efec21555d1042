"""Command line: start-up and commands only (serve, validate, schema, dev-token)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
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


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return v


def _whole(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`, else "'TEXT' is not WHAT"."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return n

    return parse


_positive = _whole(1, sys.maxsize, "a positive number of workers")
_entries = _whole(0, 1_000_000, "a number of entries from 0 to 1000000")


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
    s.add_argument(
        "--policy",
        default=_env("POLICY", ""),
        required=not os.environ.get(ENV_PREFIX + "POLICY"),
        help="policy YAML file (required) [STEPUP_POLICY]",
    )
    s.add_argument(
        "--listen",
        default=_env("LISTEN", "127.0.0.1:9191"),
        help="gRPC address HOST:PORT [STEPUP_LISTEN] (default 127.0.0.1:9191)",
    )
    s.add_argument(
        "--workers",
        type=_positive,
        default=_env("WORKERS", "1"),
        help="serving processes; worker i listens on the --listen port + i (list each as an endpoint"
        " of Envoy's ext_authz cluster). Raise it to the CPUs the pod may use when one process is"
        " saturated [STEPUP_WORKERS] (default 1)",
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
    s.add_argument(
        "--decision-log-sample-allowed",
        type=_rate,
        default=_env("DECISION_LOG_SAMPLE_ALLOWED", "1"),
        metavar="RATE",
        help="share of allowed decisions written to the decision log, 0 to 1; denials, step-ups and"
        " disagreements always are [STEPUP_DECISION_LOG_SAMPLE_ALLOWED] (default 1)",
    )
    s.add_argument(
        "--decision-cache",
        type=_entries,
        default=_env("DECISION_CACHE", "4096"),
        metavar="N",
        help="allowed decisions remembered per policy and reused for the same caller, operation and"
        " risk signals while the token, its freshness and its keys still hold; 0 turns it off"
        " [STEPUP_DECISION_CACHE] (default 4096)",
    )
    s.add_argument(
        "--candidate",
        default=_env("CANDIDATE", ""),
        metavar="FILE",
        help="a candidate policy, decided beside the active one on every Check and never enforced:"
        " disagreements are logged, traced and counted; reloaded like the policy; promote it by"
        " moving its file over the policy's [STEPUP_CANDIDATE]",
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

    v = sub.add_parser(
        "validate",
        help="check policy files; exit 1 on any problem",
        description="Parse, validate and compile each policy file; print every problem with its place.",
    )
    v.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")
    v.add_argument(
        "--offline",
        action="store_true",
        help="do not fetch jwks_uri keys (their reachability is not checked)",
    )
    v.add_argument("--format", choices=["text", "json"], default="text", help="output format (default text)")

    sc = sub.add_parser(
        "schema",
        help="print the policy's (or the decision log line's) JSON Schema",
        description="Print the policy's JSON Schema, or with --decision-log the decision log line's.",
    )
    sc.add_argument("--decision-log", action="store_true", help="the schema of a decision log line")

    te = sub.add_parser(
        "test",
        help="run YAML test cases against a policy, like `opa test`",
        description="Run the test cases of each TESTFILE (see README 'Testing a policy') against its policy;"
        " exit 1 when a case fails, 2 when a file cannot be used.",
    )
    te.add_argument("files", nargs="+", metavar="TESTFILE", help="YAML test files")
    te.add_argument("--policy", default=None, help="the policy to test (default: each file's `policy:`)")
    te.add_argument(
        "--format", choices=["text", "json", "junit"], default="text", help="report format (default text)"
    )
    te.add_argument("--run", default=None, metavar="REGEX", help="run only the cases whose name matches")
    te.add_argument(
        "--coverage",
        action="store_true",
        help="list the sensitivity, permission and risk rules no case exercised",
    )

    ex = sub.add_parser(
        "explain",
        help="show why a request gets its answer, step by step",
        description="Decide one request against a policy and print the decision as the pipeline walked it."
        " Describe the request with flags, or with --request FILE (a YAML/JSON mapping, the `request:` of a"
        " test case), or both (flags win).",
    )
    ex.add_argument("--policy", required=True, help="the policy YAML file")
    ex.add_argument("--request", metavar="FILE", help="the request description (YAML or JSON)")
    ex.add_argument("--http", metavar="'METHOD /path'", help="an HTTP call, e.g. 'GET /v1/accounts/7'")
    ex.add_argument("--grpc", metavar="/pkg.Service/Method", help="a gRPC call")
    ex.add_argument("--token", help="a real token, verified against the policy's issuers")
    ex.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="a claim taken as verified (repeatable; dotted paths; JSON values, e.g. roles='[\"teller\"]')",
    )
    ex.add_argument("--issuer", help="the issuer id of the claims (default: the policy's first)")
    ex.add_argument("--auth-age", help="seconds (or 90s, 15m, 2h) since the authentication")
    ex.add_argument("--principal", help="the mTLS peer principal")
    ex.add_argument("--source", help="the peer address (default 127.0.0.1)")
    ex.add_argument("--header", action="append", default=[], metavar="NAME=VALUE", help="a request header")
    ex.add_argument("--at", help="the time of the call (ISO 8601 or epoch seconds; default now)")
    ex.add_argument("--format", choices=["text", "json"], default="text", help="output format (default text)")

    t = sub.add_parser(
        "dev-token",
        help="mint a token with the example development key (for demos and tests)",
        description="Mint a signed JWT. Claims are set by the flags, then by --claims-file, then by --claim.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("--key", default="examples/keys/dev-private-jwk.json", help="private JWK file")
    t.add_argument("--issuer", default="https://idp.example.test", help="iss")
    t.add_argument("--audience", default="bank-api", help="aud")
    t.add_argument("--sub", default="alice", help="sub")
    t.add_argument("--roles", default="", help="roles, comma-separated (a list claim)")
    t.add_argument("--scope", default="", help="scope, space-separated")
    t.add_argument("--acr", default="", help="acr")
    t.add_argument("--amr", default="", help="amr, comma-separated, e.g. pwd,otp")
    t.add_argument("--auth-age", type=int, default=0, help="seconds since authentication (auth_time)")
    t.add_argument("--ttl", type=int, default=600, help="seconds until exp")
    t.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="any claim (repeatable): a dotted path for nesting, the value as JSON when it parses"
        " (realm_access.roles='[\"teller\"]', acrs='[\"c1\"]', sid=abc)",
    )
    t.add_argument("--claims-file", metavar="FILE", help="a JSON/YAML mapping merged into the claims")
    t.add_argument(
        "--allow-any-key", action="store_true", help="sign with a key that is not the example development key"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args.files, offline=args.offline, fmt=args.format)
    if args.command == "test":
        from sidecar import policytest

        return policytest.main(
            args.files, policy_file=args.policy, fmt=args.format, run=args.run, with_coverage=args.coverage
        )
    if args.command == "explain":
        return _explain(args)
    if args.command == "schema":
        from sidecar.policyfile import schema

        if args.decision_log:
            print((Path(__file__).parent / "decision-line.schema.json").read_text(), end="")
        else:
            print(json.dumps(schema(), indent=2))
        return 0
    if args.command == "dev-token":
        return _dev_token(args)
    from sidecar.app import serve

    return serve(args)


def _validate(files: list[str], *, offline: bool = False, fmt: str = "text") -> int:
    from sidecar.compiler import PolicyError, compile_document, load_policy
    from sidecar.keys import KeyStore
    from sidecar.policyfile import Problem, content_digest, parse_text

    failed = False
    report: list[dict[str, Any]] = []
    if offline and fmt == "text":
        print("validate: offline, jwks_uri keys are not fetched", file=sys.stderr)
    for f in files:
        entry: dict[str, Any] = {"file": f, "ok": False, "problems": [], "warnings": []}
        report.append(entry)
        try:
            if offline:
                try:
                    text = Path(f).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    raise PolicyError([Problem(f, 1, 1, "", f"cannot read the file: {e}")]) from None
                p = compile_document(
                    parse_text(text, f), base_dir=Path(f).parent, digest=content_digest(text), keys=KeyStore()
                )
            else:
                p = load_policy(f)
        except PolicyError as e:
            failed = True
            entry["problems"] = [
                {"line": x.line, "column": x.column, "where": x.where, "message": x.message}
                for x in e.problems
            ]
            if fmt == "text":
                for problem in e.problems:
                    print(problem, file=sys.stderr)
            continue
        entry.update(ok=True, version=p.version, warnings=list(p.warnings))
        if fmt == "text":
            for w in p.warnings:
                print(f"{f}: warning: {w}", file=sys.stderr)
            print(f"{f}: ok ({p.version})")
    if fmt == "json":
        print(json.dumps(report, indent=2))
    return 1 if failed else 0


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """doc[a][b][c] = value for path "a.b.c" (creating the mappings on the way)."""
    *parents, last = path.split(".")
    cur = doc
    for part in parents:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    cur[last] = value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_claim(text: str) -> tuple[str, Any]:
    """PATH=VALUE, the value as JSON when it parses (a number, a list, ...), else the string."""
    path, sep, raw = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--claim {text!r}: write PATH=VALUE")
    try:
        value: Any = json.loads(raw, parse_constant=_not_json)  # NaN, Infinity: no JSON, a string
    except ValueError:
        value = raw
    except RecursionError:  # a value nested thousands deep: refused, not taken as a string
        raise ValueError(f"--claim {path}: the value is nested too deeply") from None
    return path, value


def _fail(command: str, message: str) -> int:
    """Exit status 2 with `stepup-sidecar COMMAND: message` on stderr."""
    print(f"stepup-sidecar {command}: {message}", file=sys.stderr)
    return 2


def _load_yaml_file(path: str) -> Any:
    """A YAML (or JSON) file's document. OSError when it cannot be read; ValueError naming the
    file, the place and the problem when it is not UTF-8 or not YAML."""
    from sidecar.policyfile import YAMLProblem, load_yaml

    try:
        return load_yaml(Path(path).read_text(encoding="utf-8"))
    except YAMLProblem as e:
        raise ValueError(e.at(path)) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _explain(args: argparse.Namespace) -> int:
    from sidecar import explain
    from sidecar.cases import CaseError, PresetVerifier, build_request
    from sidecar.compiler import PolicyError, load_policy
    from sidecar.runtime import Runtime
    from sidecar.telemetry import Metrics, Telemetry

    desc: dict[str, Any] = {}
    if args.request:
        try:
            loaded = _load_yaml_file(args.request)
        except OSError as e:
            return _fail("explain", f"{args.request}: cannot read: {e.strerror}")
        except ValueError as e:
            return _fail("explain", str(e))
        request = loaded.get("request", loaded) if isinstance(loaded, dict) else None
        if not isinstance(request, dict):
            return _fail(
                "explain",
                f"{args.request}: a request description is a mapping"
                " (or a test case, with `request:` a mapping)",
            )
        desc = dict(request)
    for flag, key in (
        ("http", "http"),
        ("grpc", "grpc"),
        ("token", "token"),
        ("issuer", "issuer"),
        ("principal", "principal"),
        ("source", "source"),
        ("at", "at"),
        ("auth_age", "auth_age"),
    ):
        value = getattr(args, flag)
        if value is not None:
            desc[key] = value
    try:
        for c in args.claim:
            path, value = parse_claim(c)
            set_path(desc.setdefault("claims", {}), path, value)
        for h in args.header:
            name, sep, value = h.partition("=")
            if not sep:
                raise ValueError(f"--header {h!r}: write NAME=VALUE")
            desc.setdefault("headers", {})[name] = value
        policy = load_policy(args.policy)
        built = build_request(desc, policy, "request")
    except PolicyError as e:
        return _fail("explain", f"the policy is invalid:\n{e}")
    except (CaseError, ValueError) as e:
        return _fail("explain", str(e))
    except Exception as e:  # what no check of build_request foresaw: named, never a traceback
        return _fail("explain", f"the request cannot be built: {type(e).__name__}: {e}")
    verifier = PresetVerifier()
    verifier.presets.update(built.presets)
    runtime = Runtime(
        policy, Telemetry(None, decision_log=None, metrics=Metrics()), lambda: built.at, verifier=verifier
    )
    import asyncio

    ev = asyncio.run(runtime.evaluate(built.check))
    walked = explain.walk(ev, "explain", built.at)
    print(json.dumps(walked, indent=2) if args.format == "json" else explain.text(walked))
    return 0


def _dev_token(args: argparse.Namespace) -> int:
    from joserfc import jwt
    from joserfc.errors import JoseError
    from joserfc.jwk import import_key

    try:
        data = json.loads(Path(args.key).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JWK (a JSON object)")
    except OSError as e:
        return _fail("dev-token", f"--key {args.key}: cannot read: {e.strerror}")
    except (ValueError, RecursionError) as e:
        return _fail("dev-token", f"--key {args.key}: {e}")
    if str(data.get("kid", "")).startswith("dev-") is False and not args.allow_any_key:
        print("refusing: this is not the example development key (use --allow-any-key)", file=sys.stderr)
        return 2
    try:
        key = import_key(data)
    except (JoseError, ValueError, TypeError) as e:
        return _fail("dev-token", f"--key {args.key}: not a usable private JWK: {e}")
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
    try:
        if args.claims_file:
            extra = _load_yaml_file(args.claims_file)
            if not isinstance(extra, dict):
                raise ValueError(f"{args.claims_file}: not a mapping of claims")
            claims.update(extra)
        for c in args.claim:
            set_path(claims, *parse_claim(c))
    except (OSError, ValueError) as e:
        return _fail("dev-token", str(e))
    try:
        header = {"alg": str(data.get("alg", "RS256")), "kid": str(data.get("kid", "")), "typ": "JWT"}
        # allow_nan=False: a NaN or an infinity from the claims file would not be JSON.
        json.dumps(claims, allow_nan=False)
        token = jwt.encode(header, claims, key)
    except (JoseError, ValueError, TypeError, RecursionError) as e:
        # A claim JSON cannot hold (a YAML date, a set, text UTF-8 cannot carry, nesting too
        # deep) or a key that cannot sign with its algorithm.
        return _fail("dev-token", f"cannot make the token: {type(e).__name__}: {e}")
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
