"""Check latency while a large policy reloads in the background (hardening issue, class 6).

Starts `stepup-sidecar serve` on a generated policy (default 40,000 rules), drives it with a
closed loop of concurrent gRPC Checks, then changes the policy file and sends SIGHUP. Reports
latency percentiles of the Checks answered before the reload and of those answered while it ran
(from the SIGHUP until the reload is applied), and how long the reload took. Envoy's default
ext_authz timeout is 200 ms; the goal is p99 under 50 ms during the reload.

    python bench/reload_latency.py [--rules 40000] [--concurrency 4] [--reloads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.decide import generated_policy  # noqa: E402
from examples.stack import free_port, wait_serving  # noqa: E402
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from tests.helpers import check_request, make_token  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")


def reloads_applied(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('stepup_policy_reloads_total{result="applied"}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def drive(address: str, stop: asyncio.Event, concurrency: int, out: list[tuple[float, float]]) -> None:
    now = time.time()
    token = make_token(now=now, roles=["role0"])
    body = check_request("/gen0.v1.Service0/Get", token=token).SerializeToString()
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(CHECK, request_serializer=None, response_deserializer=None)

        async def worker() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                raw = await call(body, timeout=10)
                t1 = time.perf_counter()
                assert external_auth_pb2.CheckResponse.FromString(raw).status.code == 0
                out.append((t1, (t1 - t0) * 1000))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run(args: argparse.Namespace, policy: Path, metrics_port: int, address: str, pid: int) -> None:
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    load = asyncio.ensure_future(drive(address, stop, args.concurrency, samples))
    await asyncio.sleep(2)
    windows: list[tuple[float, float]] = []
    text = policy.read_text()
    for k in range(args.reloads):
        before = reloads_applied(metrics_port)
        policy.write_text(text.replace("level: high}", "level: critical}" if k % 2 == 0 else "level: high}"))
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGHUP)
        while reloads_applied(metrics_port) <= before:
            await asyncio.sleep(0.05)
        t1 = time.perf_counter()
        windows.append((t0, t1))
        await asyncio.sleep(1)
    stop.set()
    await load
    first = windows[0][0]
    steady = [ms for t, ms in samples if t < first - 0.2]
    during = [ms for t, ms in samples if any(a <= t <= b for a, b in windows)]
    print(f"policy: {args.rules} rules; concurrency {args.concurrency}; {args.reloads} reloads")
    print("reload took: " + ", ".join(f"{b - a:.2f} s" for a, b in windows))
    for name, xs in (("steady", steady), ("during reload", during)):
        print(
            f"{name:>14}: n={len(xs):6d}  p50={statistics.median(xs):6.2f} ms  p99={pct(xs, 0.99):6.2f} ms"
            f"  max={max(xs):7.2f} ms"
        )
    print(f"p99 during reload / goal 50 ms: {pct(during, 0.99) / 50:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=40_000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reloads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = generated_policy(args.rules, Path(tmp))
        address = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", address,
             "--metrics-listen", f"127.0.0.1:{metrics_port}", "--decision-log", "off", "--watch-interval", "0"],
            cwd=ROOT,
        )
        try:
            wait_serving(address, timeout=120)
            asyncio.run(run(args, policy, metrics_port, address, proc.pid))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
