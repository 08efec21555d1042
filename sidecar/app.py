"""One serving process: load the policy, build the runtime and the servers, serve, reload on
change or SIGHUP, drain on SIGTERM. `cli.py` parses the command line and calls `serve`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.isolated import Validator

log = logging.getLogger("stepup")


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


LARGE_YAML = 1 << 20  # bytes


def _large_yaml(path: Path) -> bool:
    try:
        return path.suffix != ".json" and path.stat().st_size > LARGE_YAML
    except OSError:
        return False


def _load(path: Path, keys: Any, child: Validator | None = None) -> Any:
    """The start-up load. A large YAML file is parsed in a child process (as reloads are; `child`,
    an `isolated.Validator` started on it): the parser's node tree would otherwise leave this
    process's heap several times the policy's size for good (freed, but too fragmented to
    return). JSON, and small files, load here."""
    from sidecar.compiler import PolicyError, load_policy, prime

    failed = None
    if child is not None:
        try:
            return prime(child.policy(keys), keys)
        except PolicyError as e:
            failed = e  # read it again here, for problems located by line (only for a broken file)
    policy = load_policy(path, keys=keys)
    if failed is not None:  # a good file that the child could not hand over: say so
        log.warning(
            "the policy validator failed (%s); the policy was loaded in this process", str(failed)
        )
    return policy


def _import_serving() -> None:
    """The modules `_run` needs, imported while the policy validator parses (the two overlap)."""
    import sidecar.ops
    import sidecar.runtime
    import sidecar.server
    import sidecar.telemetry  # noqa: F401

    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        pass


def release_free_memory() -> None:
    """Give the memory a large load freed (the parser's node tree) back to the system: glibc keeps
    freed heap otherwise, and the process's RSS would stay several times the policy's size."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def serve(args: argparse.Namespace) -> int:
    # A SIGHUP before the reload handler is installed would end the process: the policy is read
    # from scratch now anyway, so one asked for meanwhile is moot.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from sidecar.workers import die_with_parent

    die_with_parent()
    configure_logging(args.log_level)
    if not args.policy:
        print("stepup-sidecar serve: --policy (or STEPUP_POLICY) is required", file=sys.stderr)
        return 2
    from sidecar.isolated import Validator, file_stamp

    path = Path(args.policy)
    read_stamp = file_stamp(str(path))  # (before it is read: a change meanwhile is reloaded)
    child = None
    if _large_yaml(path):
        child = Validator(path, compile_in_child=False)  # it parses while this process imports
    try:  # (from here on, whatever happens, even a Ctrl-C during an import, stops the child)
        from sidecar.keys import KeyStore
        from sidecar.policyfile import PolicyError

        keys = KeyStore()
        gc.disable()  # a load allocates millions of objects: collections of the growing heap only cost
        if child is not None and args.workers <= 1:
            _import_serving()
        try:
            policy = _load(path, keys, child)
        except PolicyError as e:
            print(f"stepup-sidecar: the policy is invalid, not starting:\n{e}", file=sys.stderr)
            return 1
    finally:
        if child is not None:
            child.close()
    for w in policy.warnings:
        log.warning("policy: %s", w)
    if args.workers > 1:
        from sidecar.workers import supervise

        del policy  # the workers load the policy themselves; it was checked here
        gc.enable()  # the supervisor runs for as long as they do (red-team F3)
        release_free_memory()
        return supervise(args)
    from sidecar.isolated import settle

    settle(policy)  # the policy's objects stay out of every garbage collection from now on
    gc.enable()
    release_free_memory()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return int(runner(_run(args, policy, keys, read_stamp)))


async def _run(args: argparse.Namespace, policy: Any, keys: Any, read_stamp: tuple[Any, ...]) -> int:
    from sidecar.ops import Liveness, start_ops_server
    from sidecar.runtime import PolicyWatcher, Runtime
    from sidecar.server import build_health_server, build_server, set_serving
    from sidecar.telemetry import LineWriter, Metrics, Telemetry, tracer_provider_from_env

    streams = {"stdout": LineWriter(1), "stderr": LineWriter(2, immediate=True), "off": None}
    stream = streams[args.decision_log]
    metrics = Metrics()
    telemetry = Telemetry(tracer_provider_from_env(metrics), decision_log=stream, metrics=metrics)
    telemetry.sample_allowed = args.decision_log_sample_allowed
    runtime = Runtime(policy, telemetry, keys=keys, decision_cache=args.decision_cache)
    candidate_watcher = None
    if args.candidate:
        # Loaded before serving, by the rules of a reload: a broken candidate is reported and
        # counted, and the active policy serves regardless.
        candidate_watcher = PolicyWatcher(Path(args.candidate), runtime, args.watch_interval, candidate=True)
        if Path(args.candidate).exists():
            await candidate_watcher.reload()
        else:
            log.warning("candidate policy %s not found; none is decided until it appears", args.candidate)
    server, health_servicer = build_server(runtime, explain=args.explain)
    await set_serving(health_servicer, False, args.explain)
    servers = [server]
    if args.health_listen:
        servers.append(build_health_server(health_servicer))
    ports = [
        _bind(srv, address) for srv, address in zip(servers, (args.listen, args.health_listen), strict=False)
    ]
    if 0 in ports:
        return 1
    liveness = Liveness()
    if args.metrics_listen:
        try:
            start_ops_server(args.metrics_listen, metrics.registry, liveness.alive, lambda: liveness.ready)
        except (OSError, ValueError) as e:
            log.error("cannot serve metrics on %s: %s", args.metrics_listen, e)
            return 1
    for srv in servers:
        await srv.start()
    _sync_metrics(telemetry, runtime)  # the policy info is there from the first scrape
    await set_serving(health_servicer, True, args.explain)
    liveness.ready = True
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
    watchers = [PolicyWatcher(Path(args.policy), runtime, args.watch_interval, read_stamp=read_stamp)]
    if candidate_watcher is not None:
        watchers.append(candidate_watcher)

    pending: set[asyncio.Future[bool]] = set()

    def _reload_all() -> None:
        for w in watchers:
            fut = asyncio.ensure_future(w.reload())
            pending.add(fut)
            fut.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, _reload_all)
    tasks = [asyncio.ensure_future(_every_half_second(telemetry, runtime, liveness))]
    if args.watch_interval > 0:
        tasks.extend(asyncio.ensure_future(w.run()) for w in watchers)
    await stop.wait()
    log.info(
        "shutting down: health NOT_SERVING, finishing in-flight calls (grace %.1fs)", args.shutdown_grace
    )
    await set_serving(health_servicer, False, args.explain)
    liveness.ready = False
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


async def _every_half_second(telemetry: Any, runtime: Any, liveness: Any) -> None:
    """The decision log's flush, the metrics kept as plain integers, and the liveness beat."""
    while True:
        await asyncio.sleep(0.5)
        liveness.beat()
        telemetry.flush()
        _sync_metrics(telemetry, runtime)


def _sync_metrics(telemetry: Any, runtime: Any) -> None:
    try:
        policies = {"active": runtime.policy, "candidate": runtime.candidate_policy}
        telemetry.metrics.sync(runtime.verifier, policies, runtime.decision_cache_counts)
    except Exception as e:  # never stop flushing for a metric
        from sidecar.telemetry import log_internal_error

        log_internal_error("metrics sync failed", e)
