"""Soak: a steady load of realistic Check calls against the sidecar; errors, wrong decisions,
latency percentiles and the sidecar's memory at start and end. Not part of `make test`.

    python bench/soak.py [--duration 60] [--concurrency 32] [--target HOST:PORT] [--pid PID]

Without --target it starts `python -m sidecar serve` on the example policy on a free port and
stops it at the end. The mix: allow, step-up, permission deny, bad token, no token, public; gRPC
and HTTP callers. Each request carries the answer it must get; any other answer is a wrong
decision. Exit status 1 on any error or wrong decision.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from joserfc.jwk import import_key  # noqa: E402

from examples.stack import free_port, wait_serving  # noqa: E402
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from tests.helpers import EXAMPLE_POLICY, PRIVATE_JWK, check_request, make_token  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"


def mix() -> list[tuple[str, bytes, tuple[int, str]]]:
    """(name, serialized CheckRequest, expected (status code, reason)) for a realistic blend."""
    now = int(time.time())
    key = import_key(PRIVATE_JWK)

    def tok(**kw: Any) -> str:
        return make_token(now=now, key=key, exp=now + 3600, **kw)

    tellers = [tok(sub=f"teller{i}") for i in range(20)]  # several users, cached after first use
    strong = tok(sub="strong", acr="phr")
    admin = tok(sub="root", roles=["admin"], acr="phrh")
    items: list[tuple[str, Any, tuple[int, str]]] = []
    for i, t in enumerate(tellers):
        items.append(
            (f"grpc balance allow {i}", check_request("/bank.v1.Accounts/GetBalance", token=t), (0, ""))
        )
        items.append(
            (
                f"http balance allow {i}",
                check_request("/v1/accounts/7/balance", method="GET", grpc=False, token=t),
                (0, ""),
            )
        )
    items += [
        (
            "grpc transfer step-up",
            check_request("/bank.v1.Payments/Transfer", token=tellers[0]),
            (16, "acr_too_low"),
        ),
        (
            "http transfer step-up",
            check_request("/v1/transfers", method="POST", grpc=False, token=tellers[1]),
            (16, "acr_too_low"),
        ),
        ("grpc transfer allow", check_request("/bank.v1.Payments/Transfer", token=strong), (0, "")),
        (
            "grpc admin deny",
            check_request("/bank.v1.Admin/SetPermissions", token=strong),
            (7, "permission_denied"),
        ),
        ("grpc admin allow", check_request("/bank.v1.Admin/SetPermissions", token=admin), (0, "")),
        (
            "grpc bad token",
            check_request("/bank.v1.Accounts/GetBalance", token="not.a.jwt"),
            (16, "malformed_token"),
        ),
        ("grpc no token", check_request("/bank.v1.Accounts/GetBalance"), (16, "missing_credential")),
        ("http public", check_request("/healthz", method="GET", grpc=False), (0, "")),
        (
            "http invalid path",
            check_request("/v1/accounts/%2e%2e/admin%2Fx", method="GET", grpc=False),
            (3, "invalid_path"),
        ),
        (
            "http untrusted network step-up",
            check_request(
                "/v1/accounts/7/balance", method="GET", grpc=False, token=tellers[2], source="203.0.113.9"
            ),
            (16, "acr_too_low"),
        ),
    ]
    return [(name, req.SerializeToString(), want) for name, req, want in items]


@dataclass
class Stats:
    calls: int = 0
    errors: int = 0
    wrong: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    wrong_samples: list[str] = field(default_factory=list)


async def worker(n: int, address: str, items: list[Any], deadline: float, stats: Stats) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
        i = n * 7
        while time.monotonic() < deadline:
            name, body, want = items[i % len(items)]
            i += 1
            t0 = time.perf_counter()
            try:
                raw = await call(body, timeout=5)
            except grpc.aio.AioRpcError as e:
                stats.errors += 1
                if len(stats.error_samples) < 5:
                    stats.error_samples.append(f"{name}: {e.code().name} {e.details()}")
                continue
            stats.latencies.append(time.perf_counter() - t0)
            stats.calls += 1
            resp = external_auth_pb2.CheckResponse.FromString(raw)
            got = (resp.status.code, resp.status.message if resp.status.code else "")
            if got != want:
                stats.wrong += 1
                if len(stats.wrong_samples) < 5:
                    stats.wrong_samples.append(f"{name}: got {got}, want {want}")


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def soak(
    address: str, duration: float, concurrency: int, pid: int | None, warmup: float
) -> dict[str, Any]:
    items = mix()
    # Warm-up (token cache, lookup caches, connections): not counted.
    warm = Stats()
    await asyncio.gather(
        *(worker(n, address, items, time.monotonic() + warmup, warm) for n in range(concurrency))
    )
    rss_start = rss_kib(pid)
    stats = Stats()
    t0 = time.monotonic()
    deadline = t0 + duration
    rss_samples: list[int] = []

    async def sample_rss() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            v = rss_kib(pid)
            if v is not None:
                rss_samples.append(v)

    await asyncio.gather(
        sample_rss(), *(worker(n, address, items, deadline, stats) for n in range(concurrency))
    )
    elapsed = time.monotonic() - t0
    lat = sorted(stats.latencies)
    return {
        "duration_s": round(elapsed, 1),
        "concurrency": concurrency,
        "calls": stats.calls,
        "calls_per_s": round(stats.calls / elapsed, 1),
        "errors": stats.errors,
        "wrong_decisions": stats.wrong,
        "warmup_errors": warm.errors,
        "warmup_wrong": warm.wrong,
        "latency_ms_p50": round(pct(lat, 50) * 1000, 2),
        "latency_ms_p90": round(pct(lat, 90) * 1000, 2),
        "latency_ms_p99": round(pct(lat, 99) * 1000, 2),
        "latency_ms_max": round(lat[-1] * 1000, 2) if lat else None,
        "latency_ms_mean": round(statistics.fmean(lat) * 1000, 2) if lat else None,
        "rss_kib_start": rss_start,
        "rss_kib_end": rss_kib(pid),
        "rss_kib_max": max(rss_samples) if rss_samples else None,
        "error_samples": stats.error_samples + warm.error_samples,
        "wrong_samples": stats.wrong_samples + warm.wrong_samples,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of measured load (default 60)")
    ap.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first (default 2)")
    ap.add_argument("--target", default="", help="HOST:PORT of a running sidecar (default: start one)")
    ap.add_argument("--pid", type=int, default=None, help="PID of the --target sidecar, for its RSS")
    ap.add_argument("--policy", default=str(EXAMPLE_POLICY), help="policy for the started sidecar")
    args = ap.parse_args(argv)

    proc: subprocess.Popen[bytes] | None = None
    address, pid = args.target, args.pid
    if not address:
        address = f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--policy",
                args.policy,
                "--listen",
                address,
                "--decision-log",
                "off",
                "--watch-interval",
                "0",
            ],
            cwd=ROOT,
            env={**os.environ, "OTEL_TRACES_EXPORTER": os.environ.get("OTEL_TRACES_EXPORTER", "none")},
            stdout=subprocess.DEVNULL,
        )
        pid = proc.pid
    try:
        wait_serving(address)
        report = asyncio.run(soak(address, args.duration, args.concurrency, pid, args.warmup))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    width = max(len(k) for k in report)
    print(f"soak against {address}" + (f" (pid {pid})" if pid else ""))
    for k, v in report.items():
        if isinstance(v, list):
            for line in v:
                print(f"  {k}: {line}")
        else:
            print(f"  {k:<{width}} {v}")
    if report["rss_kib_start"] and report["rss_kib_end"]:
        print(f"  rss growth: {report['rss_kib_end'] - report['rss_kib_start']} KiB")
    ok = report["errors"] == 0 and report["wrong_decisions"] == 0 and report["calls"] > 0
    ok = ok and report["warmup_errors"] == 0 and report["warmup_wrong"] == 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
