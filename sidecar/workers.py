"""`serve --workers N`: N serving processes, worker i on its own port (the `--listen` port + i).

Envoy opens few connections to an authorization cluster and balances gRPC per request across its
endpoints, so listing each worker's port as an endpoint balances well, where one port shared
with SO_REUSEPORT (balanced per connection by the kernel) can leave a worker with all the load.

This process supervises the workers: it starts them, restarts one that dies, forwards SIGHUP
(reload) and SIGTERM/SIGINT (drain) to them, serves the aggregated Prometheus metrics
(prometheus-client's multiprocess mode) and, on `--health-listen`, a health service that is
SERVING only while every worker is. Each worker watches and reloads the policy itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

log = logging.getLogger("stepup.workers")

WORKER_ENV = "STEPUP_WORKER_INDEX"
SUPERVISOR_ENV = "STEPUP_SUPERVISOR_PID"
STABLE = 60.0  # seconds a restarted worker must stay up before its back-off starts over


def die_with_parent() -> None:
    """In a worker: SIGTERM this process when its supervisor dies (even by SIGKILL), so no worker
    serves unsupervised (Linux; elsewhere nothing is done)."""
    if WORKER_ENV not in os.environ:
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover (not Linux/glibc)
        return
    if str(os.getppid()) != os.environ.get(SUPERVISOR_ENV):  # it died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def worker_argv(args: argparse.Namespace, index: int, port: int, host: str) -> list[str]:
    argv = [
        sys.executable, "-m", "sidecar", "serve",
        "--policy", args.policy,
        "--listen", f"{host}:{port}",
        "--workers", "1",
        "--health-listen", "",
        "--metrics-listen", "",
        "--decision-log", args.decision_log,
        "--log-level", args.log_level,
        "--watch-interval", str(args.watch_interval),
        "--drain-delay", str(args.drain_delay),
        "--shutdown-grace", str(args.shutdown_grace),
        "--explain" if args.explain else "--no-explain",
        "--candidate", args.candidate,
        "--decision-log-sample-allowed", str(args.decision_log_sample_allowed),
        "--decision-cache", str(args.decision_cache),
    ]  # fmt: skip
    return argv


def supervise(args: argparse.Namespace) -> int:
    host, _, port_text = args.listen.rpartition(":")
    try:
        base = int(port_text)
    except ValueError:
        base = 0
    if base <= 0:
        print("stepup-sidecar serve: --workers needs a fixed --listen port (worker i listens on port + i)",
              file=sys.stderr)  # fmt: skip
        return 2
    last = base + args.workers - 1
    if last > 65535:
        print(f"stepup-sidecar serve: {args.workers} workers from port {base} need ports up to {last}"
              " (above 65535)", file=sys.stderr)  # fmt: skip
        return 2
    for flag, address in (("--health-listen", args.health_listen), ("--metrics-listen", args.metrics_listen)):
        port = address.rpartition(":")[2]
        if port.isdigit() and base <= int(port) <= last:
            print(f"stepup-sidecar serve: {flag} {address} is one of the workers' ports ({base}-{last})",
                  file=sys.stderr)  # fmt: skip
            return 2
    metrics_dir = tempfile.mkdtemp(prefix="stepup-metrics-")
    try:
        try:
            import uvloop

            return int(uvloop.run(_supervise(args, host, base, metrics_dir)))
        except ImportError:  # pragma: no cover
            return asyncio.run(_supervise(args, host, base, metrics_dir))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


class _Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started = 0.0
        self.restart_at: float | None = None

    def start(self) -> None:
        # SIGHUP ignored from the fork on: a reload forwarded while a restarted worker still
        # starts up must not kill it (its serve() takes SIGHUP over once it can reload).
        self.proc = subprocess.Popen(
            self.argv, env=self.env, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)
        )
        self.started = time.monotonic()
        self.restart_at = None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


async def _supervise(args: argparse.Namespace, host: str, base: int, metrics_dir: str) -> int:
    from grpc_health.v1 import health_pb2

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, SUPERVISOR_ENV: str(os.getpid())}
    workers = []
    for i in range(args.workers):
        w = _Worker(i, worker_argv(args, i, base + i, host), {**env, WORKER_ENV: str(i)})
        w.start()
        workers.append(w)
    log.info("started %d workers on %s ports %d-%d", args.workers, host, base, base + args.workers - 1)

    from sidecar.ops import Liveness, start_ops_server

    liveness = Liveness()  # ready: every worker SERVING
    if args.metrics_listen:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        try:
            start_ops_server(args.metrics_listen, registry, liveness.alive, lambda: liveness.ready)
        except (OSError, ValueError) as e:
            log.error("cannot serve metrics on %s: %s", args.metrics_listen, e)
            for w in workers:
                w.signal(signal.SIGTERM)
            return 1

    health_server = None
    health_servicer = None
    if args.health_listen:
        from grpc_health.v1 import health

        from sidecar.server import build_health_server

        health_servicer = health.aio.HealthServicer()
        health_server = build_health_server(health_servicer)
        if not health_server.add_insecure_port(args.health_listen):
            log.error("cannot listen on %s", args.health_listen)
            for w in workers:
                w.signal(signal.SIGTERM)
            return 1
        await health_server.start()

    stop = asyncio.Event()
    received: list[int] = []
    loop = asyncio.get_running_loop()
    def on_stop(sig: int) -> None:
        received.append(sig)
        stop.set()

    def on_hup() -> None:
        for w in workers:
            w.signal(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGTERM, on_stop, signal.SIGTERM)
    loop.add_signal_handler(signal.SIGINT, on_stop, signal.SIGINT)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    async def watch() -> None:
        """Restart a worker that died (backing off, without holding up anything else), and keep
        the aggregate health current: SERVING only while every worker is alive and SERVING."""
        addresses = [f"{host}:{base + w.index}" for w in workers]
        while not stop.is_set():
            try:
                now = time.monotonic()
                dead = False
                for w in workers:
                    assert w.proc is not None
                    if w.proc.poll() is None:
                        if w.restarts and now - w.started > STABLE:
                            w.restarts = 0  # up long enough: the next crash starts the back-off over
                        continue
                    dead = True
                    if w.restart_at is None:
                        _forget(w.proc.pid, metrics_dir)
                        delay = min(30.0, 0.5 * 2 ** min(w.restarts, 6))
                        log.error(
                            "worker %d exited with %s; restarting in %.1fs", w.index, w.proc.returncode, delay
                        )
                        w.restarts += 1
                        w.restart_at = now + delay
                    elif now >= w.restart_at:
                        w.start()
                serving = False
                if not dead:
                    states = await asyncio.gather(*(_health(a) for a in addresses))
                    serving = all(st == health_pb2.HealthCheckResponse.SERVING for st in states)
                if stop.is_set():
                    break  # draining: the stop path owns health now
                liveness.ready = serving
                if health_servicer is not None:
                    await _set(health_servicer, serving)
                liveness.beat()
            except Exception as e:  # e.g. a restart failing for memory: log it, keep supervising
                log.error("supervising workers failed: %s: %s", type(e).__name__, e)
                liveness.ready = False
                if health_servicer is not None and not stop.is_set():
                    try:
                        await _set(health_servicer, False)
                    except Exception:  # noqa: S110 (health could not even be set: try next round)
                        pass
            await asyncio.sleep(0.5)

    watcher = asyncio.ensure_future(watch())
    await stop.wait()
    watcher.cancel()
    liveness.ready = False
    if health_servicer is not None:
        await _set(health_servicer, False)
    log.info("stopping %d workers", len(workers))
    for w in workers:
        w.signal(received[0] if received else signal.SIGTERM)
    budget = args.drain_delay + args.shutdown_grace + 5
    deadline = time.monotonic() + budget
    codes = []
    for w in workers:
        assert w.proc is not None
        left = max(0.1, deadline - time.monotonic())
        try:
            codes.append(await asyncio.to_thread(w.proc.wait, left))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            codes.append(await asyncio.to_thread(w.proc.wait))
    watcher.cancel()
    if health_server is not None:
        await health_server.stop(0)
    log.info("stopped")
    return 0 if all(c == 0 for c in codes) else 1


def _forget(pid: int, metrics_dir: str) -> None:
    """A dead worker's live gauges (policy info) leave the aggregate; its counters stay."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except OSError:
        pass


async def _health(address: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        async with grpc.aio.insecure_channel(address) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        return int(resp.status)
    except grpc.aio.AioRpcError:
        return -1


async def _set(h: Any, serving: bool) -> None:
    from grpc_health.v1 import health_pb2

    from sidecar.server import AUTH_SERVICE

    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", AUTH_SERVICE):
        await h.set(name, status)
