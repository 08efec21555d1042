"""Command line: start-up and commands only (serve, validate, schema, dev-token)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
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
        from sidecar.config import schema

        print(json.dumps(schema(), indent=2))
        return 0
    if args.command == "dev-token":
        return _dev_token(args)
    return _serve(args)


class _JsonFormatter(logging.Formatter):
    """One JSON object per operational log line (decision lines are written by telemetry)."""

    _SKIP = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _validate(files: list[str]) -> int:
    from sidecar.config import PolicyError, load_policy

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


# Libraries that log request content on a parse warning (OpenTelemetry logs an invalid
# `tracestate` member verbatim, once per request): nothing from a request may reach the logs, and
# one line per request would let a client flood them. Their errors still show.
_REQUEST_FACING_LOGGERS = (
    "opentelemetry.trace",
    "opentelemetry.baggage",
    "opentelemetry.propagate",
    "opentelemetry.propagators",
    "opentelemetry.attributes",
    "opentelemetry.context",
)


class _LibraryArgsFilter(logging.Filter):
    """Any other library record below ERROR keeps its message template but loses its arguments,
    where request content could hide (a header value, a path)."""

    _KEEP = ("stepup", "opentelemetry.exporter")  # ours, and exporters (endpoints, not requests)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._KEEP) and record.levelno < logging.ERROR and record.args:
            record.msg = f"{record.msg} (arguments withheld)"
            record.args = None
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    handler.addFilter(_LibraryArgsFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for name in _REQUEST_FACING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if not args.policy:
        print("stepup-sidecar serve: --policy (or STEPUP_POLICY) is required", file=sys.stderr)
        return 2
    from sidecar.config import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        print(f"stepup-sidecar: the policy is invalid, not starting:\n{e}", file=sys.stderr)
        return 1
    for w in policy.warnings:
        log.warning("policy: %s", w)
    from sidecar.isolated import settle

    settle(policy)  # the policy's objects stay out of every garbage collection from now on
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return int(runner(_run(args, policy)))


async def _run(args: argparse.Namespace, policy: Any) -> int:
    from prometheus_client import start_http_server

    from sidecar.server import Decider, PolicyWatcher, build_health_server, build_server, set_serving
    from sidecar.telemetry import Metrics, Telemetry, tracer_provider_from_env

    stream = {"stdout": sys.stdout, "stderr": sys.stderr, "off": None}[args.decision_log]
    metrics = Metrics()
    telemetry = Telemetry(tracer_provider_from_env(metrics), decision_log=stream, metrics=metrics)
    decider = Decider(policy, telemetry)
    server, health_servicer = build_server(decider, explain=args.explain)
    await set_serving(health_servicer, False, args.explain)
    servers = [server]
    if args.health_listen:
        servers.append(build_health_server(health_servicer))
    ports = [
        _bind(srv, address) for srv, address in zip(servers, (args.listen, args.health_listen), strict=False)
    ]
    if 0 in ports:
        return 1
    if args.metrics_listen:
        host, _, mport = args.metrics_listen.rpartition(":")
        start_http_server(int(mport), addr=host or "127.0.0.1", registry=metrics.registry)
    for srv in servers:
        await srv.start()
    await set_serving(health_servicer, True, args.explain)
    log.info(
        "serving Authorization/Check on %s:%d (policy %s)",
        args.listen.rpartition(":")[0],
        ports[0],
        policy.version,
    )
    if args.health_listen:
        log.info("serving grpc.health.v1 only on %s:%d", args.health_listen.rpartition(":")[0], ports[1])

    stop = asyncio.Event()
    received: list[int] = []
    loop = asyncio.get_running_loop()

    def _on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig)
    watcher = PolicyWatcher(Path(args.policy), decider, args.watch_interval)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(watcher.reload()))
    tasks = [asyncio.ensure_future(_flush_every(telemetry, 0.5))]
    if args.watch_interval > 0:
        tasks.append(asyncio.ensure_future(watcher.run()))
    await stop.wait()
    log.info(
        "shutting down: health NOT_SERVING, finishing in-flight calls (grace %.1fs)", args.shutdown_grace
    )
    await set_serving(health_servicer, False, args.explain)
    if args.drain_delay > 0 and received[:1] == [signal.SIGTERM]:
        # Keep answering while callers and probes see NOT_SERVING: gRPC's stop() would cancel
        # calls that have arrived but not yet reached the servicer.
        await asyncio.sleep(args.drain_delay)
    await server.stop(args.shutdown_grace)
    for srv in servers[1:]:
        await srv.stop(0)
    for t in tasks:
        t.cancel()
    telemetry.shutdown()
    log.info("stopped")
    return 0


def _bind(server: Any, address: str) -> int:
    """Bind an address; returns the port (0 on failure, after logging why)."""
    try:
        port = int(server.add_insecure_port(address))
    except RuntimeError:
        port = 0
    if not port:
        log.error("cannot listen on %s (in use, or not a local address)", address)
    return port


async def _flush_every(telemetry: Any, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        telemetry.flush()


if __name__ == "__main__":
    sys.exit(main())
