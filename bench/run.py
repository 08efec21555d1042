"""`make bench`: every goal of the perf-and-tracing issue, measured against a baseline in the same
run, printed as one table with each goal marked met or missed. Not part of `make test`.

One alternating harness serves every throughput figure: bare, sidecar, bare, sidecar, ... for
`--rounds` rounds of h2load (Debian nghttp2-client, installed when missing), a per-round ratio,
the median ratio, and CPU per call read from /proc. The bare server is a grpc.aio + uvloop
servicer that answers every Check with a constant OK. Every figure checks that the answers were
the expected ones (the sidecar's decision counters), since h2load only sees HTTP 200.

    python bench/run.py [--rounds 3] [--seconds 6] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from examples.stack import (  # noqa: E402
    ENVOY,
    ENVOY_YAML,
    free_port,
    free_ports,
    health_status,
    new_bank,
    new_envoy,
)
from tests.helpers import ACR_PHR, EXAMPLE_POLICY, check_request, make_token  # noqa: E402

BARE = """
import sys, uvloop, grpc
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb, external_auth_pb2_grpc as rpc
from google.rpc import status_pb2
OK = pb.CheckResponse(status=status_pb2.Status(code=0))
class S(rpc.AuthorizationServicer):
    async def Check(self, request, context):
        return OK
async def main():
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    server = grpc.aio.server()
    rpc.add_AuthorizationServicer_to_server(S(), server)
    h = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    await h.set("", health_pb2.HealthCheckResponse.SERVING)
    await h.set("envoy.service.auth.v3.Authorization", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    await server.wait_for_termination()
uvloop.run(main())
"""
CHECK_URL = "/envoy.service.auth.v3.Authorization/Check"


# --- processes --------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    ports: list[int]
    metrics_port: int = 0

    def cpu_seconds(self) -> float:
        """utime + stime of the server and its children (workers)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def decisions(self) -> dict[str, float]:
        if not self.metrics_port:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r'stepup_decisions_total\{outcome="(\w+)",reason="(\w+)"\} ([\d.e+]+)', line)
            if m:
                out[f"{m[1]}:{m[2]}"] = out.get(f"{m[1]}:{m[2]}", 0) + float(m[3])
        return out

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def start_bare(n: int = 1) -> Server:
    base = free_ports(n)
    procs = []
    # n bare servers, one per port, under one process group (a shell).
    cmd = " & ".join(f"{sys.executable} -c '{BARE}' 127.0.0.1:{base + i}" for i in range(n)) + " & wait"
    proc = subprocess.Popen(["bash", "-c", cmd], start_new_session=True, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    procs.append(proc)
    for i in range(n):
        _wait_health(f"127.0.0.1:{base + i}")
    return Server(proc, [base + i for i in range(n)])


def start_sidecar(
    workers: int = 1, env: dict[str, str] | None = None, policy: Path = EXAMPLE_POLICY
) -> Server:
    base = free_ports(max(workers, 1))
    mport = free_port()
    e = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "STEPUP_DECISION_LOG": "stdout", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", f"127.0.0.1:{base}",
         "--workers", str(workers), "--metrics-listen", f"127.0.0.1:{mport}", "--watch-interval", "0",
         "--log-level", "error", "--drain-delay", "0"],
        env=e, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for i in range(workers):
        _wait_health(f"127.0.0.1:{base + i}")
    return Server(proc, [base + i for i in range(workers)], mport)


def pinned(start: Callable[[], Server]) -> Callable[[], Server]:
    """`start`, then each of its serving processes (bare servers, sidecar workers: the children
    of the process started) and all their threads pinned to a CPU of its own (the i-th to CPU
    i). Unpinned, two bare servers on two cores land in one of two modes, 7,300 or 18,500
    calls/s (CPU per call 228 or 103 µs) as the scheduler moves their threads; pinned they serve
    15,500-17,700 every time, so the ratio measures the servers, not the scheduler."""

    def start_pinned() -> Server:
        srv = start()
        cpus = sorted(os.sched_getaffinity(0))
        for i, pid in enumerate(sorted(_children(srv.proc.pid))):
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), {cpus[i % len(cpus)]})
                except OSError:
                    pass  # a thread that has ended meanwhile
        return srv

    return start_pinned


def _wait_health(address: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while health_status(address, timeout=0.3) != 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{address} never SERVING")
        time.sleep(0.1)


# --- load --------------------------------------------------------------------------------------------


def ensure_tool(command: str, package: str) -> None:
    """Install the Debian `package` that provides `command` when it is missing."""
    if shutil.which(command):
        return
    print(f"installing {command} (Debian {package}) ...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, capture_output=True)


def ensure_h2load() -> None:
    ensure_tool("h2load", "nghttp2-client")


def h2load(ports: list[int], body: Path, seconds: float, clients: int, streams: int, rps: int = 0) -> float:
    """Calls/s over all `ports` (one h2load per port, at the same time); only HTTP 200 counts."""
    procs = []
    for port in ports:
        argv = ["h2load", "-D", str(int(seconds)), "-c", str(max(1, clients // len(ports))), "-m", str(streams),
                "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]  # fmt: skip
        if rps:
            argv.append(f"--rps={max(1, rps // clients)}")
        procs.append(
            subprocess.Popen(
                [*argv, f"http://127.0.0.1:{port}{CHECK_URL}"], stdout=subprocess.PIPE, text=True
            )
        )
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
        assert m is not None, out
        total += int(m[1]) / seconds
    return total


@dataclass
class Alternating:
    """bare, subject, bare, subject, ...: per-round ratios of calls/s and CPU per call."""

    rounds: list[tuple[float, float]] = field(default_factory=list)  # (bare, subject) calls/s
    cpu: list[tuple[float, float]] = field(default_factory=list)  # µs of CPU per call
    checked: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(s / b for b, s in self.rounds)

    def spread(self) -> str:
        rs = sorted(s / b for b, s in self.rounds)
        return f"{rs[0]:.2f}-{rs[-1]:.2f}"


def _near(x: float, target: float) -> str:
    """Two decimals, or three where two would read as the target itself (0.598 is not 0.60)."""
    return f"{x:.3f}" if f"{x:.2f}" == f"{target:.2f}" and x != target else f"{x:.2f}"


def alternate(
    rounds: int,
    seconds: float,
    body: Path,
    start_subject: Callable[[], Server],
    start_baseline: Callable[[], Server],
    expect: str,
    clients: int = 4,
    streams: int = 8,
) -> Alternating:
    out = Alternating()
    for _ in range(rounds):
        figures = []
        for start in (start_baseline, start_subject):
            srv = start()
            try:
                h2load(srv.ports, body, 1, clients, streams)  # warm-up
                before_d, c0 = srv.decisions(), srv.cpu_seconds()
                rate = h2load(srv.ports, body, seconds, clients, streams)
                c1, after_d = srv.cpu_seconds(), srv.decisions()
                calls = rate * seconds
                figures.append((rate, (c1 - c0) / calls * 1e6))
                if srv.metrics_port:
                    got = {k: after_d.get(k, 0) - before_d.get(k, 0) for k in after_d}
                    wrong = sum(v for k, v in got.items() if k != expect)
                    out.checked.append(f"{got.get(expect, 0):.0f} {expect}, {wrong:.0f} other")
                    assert wrong == 0, got
            finally:
                srv.stop()
        out.rounds.append((figures[0][0], figures[1][0]))
        out.cpu.append((figures[0][1], figures[1][1]))
    return out


# --- figures -------------------------------------------------------------------------------------------


def check_body(tmp: Path) -> Path:
    now = time.time()
    token = make_token(now=now, acr=ACR_PHR, exp=int(now) + 7200)
    msg = check_request(
        "/bank.v1.Payments/Transfer",
        token=token,
        headers={
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "user-agent": "grpc-go/1.70",
            "x-request-id": "a3f1c6c2-1b1e-4c55-9d6e-3f5c2a8c9e11",
            "x-forwarded-proto": "http",
            "te": "trailers",
        },
    ).SerializeToString()
    body = tmp / "check.bin"
    body.write_bytes(b"\x00" + struct.pack(">I", len(msg)) + msg)
    return body


def traced(rounds: int, seconds: float, body: Path) -> tuple[Alternating, int, int, float]:
    """Every decision sampled and exported over OTLP/gRPC to a live receiver in another process."""
    rx = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "otlp_receiver.py")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert rx.stdout is not None
    ports = json.loads(rx.stdout.readline())
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{ports['grpc_port']}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_TRACES_SAMPLER": "always_on"}  # fmt: skip

    def received() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http_port']}/", timeout=5) as r:
            return int(json.loads(r.read())["spans"])

    try:
        res = alternate(rounds, seconds, body, lambda: start_sidecar(env=env), start_bare, "allow:allowed")
        # Then at half of the measured traced rate, steady: every span must arrive.
        srv = start_sidecar(env=env)
        try:
            half = int(statistics.median(s for _, s in res.rounds) / 2)
            before = received()
            d0 = sum(srv.decisions().values())
            h2load(srv.ports, body, seconds, 4, 8, rps=half)
            time.sleep(7)
            sent = int(sum(srv.decisions().values()) - d0)
            got = received() - before
            dropped = _metric(srv, "stepup_spans_dropped_total")
        finally:
            srv.stop()
        return res, sent, got, dropped
    finally:
        rx.terminate()
        rx.wait(10)


def _metric(srv: Server, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def envoy_latency(n: int, workdir: Path) -> dict[str, list[float]]:
    """Latency of GET /v1/accounts/7/balance through Envoy at concurrency 1, in µs: with ext_authz
    to the sidecar, to the bare server, and Envoy without ext_authz (the floor)."""
    bank = new_bank(workdir, "bench-bank").start()
    token = make_token(now=time.time(), exp=int(time.time()) + 7200)
    out: dict[str, list[float]] = {}
    try:
        for name in ("none", "bare", "sidecar"):
            srv = start_bare(2) if name == "bare" else start_sidecar() if name == "sidecar" else None
            src = ENVOY_YAML
            if name == "none":
                doc = yaml.safe_load(ENVOY_YAML.read_text())
                hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
                    "typed_config"
                ]
                hcm["http_filters"] = [
                    f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_authz"
                ]
                src = workdir / "envoy-noauthz.yaml"
                src.write_text(yaml.safe_dump(doc))
            port = srv.ports[0] if srv else free_ports(2)
            envoy = new_envoy(workdir, src, f"bench-envoy-{name}", ext_authz=port, upstream=bank).start()
            try:
                time.sleep(1.5)  # the ext_authz health check admits the endpoints
                out[name] = _sequential(envoy.address, token, n)
            finally:
                envoy.stop()
                if srv:
                    srv.stop()
    finally:
        bank.stop()
    return out


def _sequential(address: str, token: str, n: int) -> list[float]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    lat = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        conn.request("GET", "/v1/accounts/7/balance", headers={"authorization": f"Bearer {token}"})
        r = conn.getresponse()
        r.read()
        if i >= 200:
            lat.append((time.perf_counter() - t0) * 1e6)
        assert r.status == 200, r.status
    conn.close()
    return lat


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def decision_flatness() -> float:
    """In-process decision: 100,000 rules vs 10 (the example policy), median µs ratio."""
    from bench.decide import generated_policy, median_us, scenarios
    from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2
    from sidecar.attributes import from_check_request
    from sidecar.compiler import load_policy
    from sidecar.engine import Engine

    def cost(policy: Any, gen: int) -> float:
        engine = Engine(policy, cache_size=0)  # the tables' cost (a cache hit reads no table)
        raw = scenarios(policy, gen)["allow (low)"]
        attrs = from_check_request(external_auth_pb2.CheckRequest.FromString(raw))
        now = time.time()
        engine.decide(attrs, now)
        return median_us(lambda: engine.decide(attrs, now), 3000, 5)

    small = cost(load_policy(EXAMPLE_POLICY), 0)
    with tempfile.TemporaryDirectory() as tmp:
        big = cost(load_policy(generated_policy(100_000, Path(tmp))), 100_000)
    return big / small


# --- the table -----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and seconds, no policy-load figure")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 3
    ensure_h2load()
    rows: list[tuple[str, str, str, bool]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        body = check_body(tmp)

        one = alternate(args.rounds, args.seconds, body, start_sidecar, start_bare, "allow:allowed")
        rows.append(
            (
                "throughput, 1 process, default settings (decision log on)",
                f"{_near(one.ratio, 0.80)} of bare ({one.spread()})",
                ">= 0.80",
                one.ratio >= 0.80,
            )
        )
        notes.append(
            f"CPU per call, bare / sidecar: {statistics.median(b for b, _ in one.cpu):.0f} / {statistics.median(s for _, s in one.cpu):.0f} µs"
        )

        off = alternate(
            args.rounds,
            args.seconds,
            body,
            lambda: start_sidecar(env={"STEPUP_DECISION_LOG": "off"}),
            start_bare,
            "allow:allowed",
        )
        notes.append(f"same with the decision log off: {off.ratio:.2f} of bare ({off.spread()})")

        tr, sent, got, dropped = traced(args.rounds, args.seconds, body)
        rows.append(
            (
                "every decision traced (always_on, OTLP to a live receiver)",
                f"{_near(tr.ratio, 0.60)} of bare ({tr.spread()})",
                ">= 0.60",
                tr.ratio >= 0.60,
            )
        )
        rows.append(
            (
                "  ... spans received at half of that peak, steady",
                f"{got} of {sent}, {dropped:.0f} dropped",
                "all",
                got == sent and dropped == 0,
            )
        )

        two = alternate(
            args.rounds,
            args.seconds,
            body,
            pinned(lambda: start_sidecar(workers=2)),
            pinned(lambda: start_bare(2)),
            "allow:allowed",
        )
        rows.append(
            (
                "2 workers vs 2 bare servers (a CPU each, one h2load per port)",
                f"{_near(two.ratio, 0.80)} ({two.spread()})",
                ">= 0.80",
                two.ratio >= 0.80,
            )
        )
        notes.append(
            f"2 workers: {statistics.median(s for _, s in two.rounds):.0f} calls/s (1 process: {statistics.median(s for _, s in one.rounds):.0f})"
        )

        if ENVOY.exists():
            lat = envoy_latency(1000 if not args.quick else 300, tmp)
            floor = statistics.median(lat["none"])
            added_bare = statistics.median(lat["bare"]) - floor
            added_side = statistics.median(lat["sidecar"]) - floor
            ratio = added_side / added_bare if added_bare > 0 else float("inf")
            rows.append(("latency added through Envoy, concurrency 1 (p50 over Envoy alone)",
                         f"{added_side:.0f} µs vs bare {added_bare:.0f} µs = {_near(ratio, 1.2)}x", "<= 1.2x", ratio <= 1.2))  # fmt: skip
            notes.append(
                f"through Envoy, p50/p99 µs: none {floor:.0f}/{pct(lat['none'], 0.99):.0f}, bare {statistics.median(lat['bare']):.0f}/{pct(lat['bare'], 0.99):.0f}, sidecar {statistics.median(lat['sidecar']):.0f}/{pct(lat['sidecar'], 0.99):.0f}"
            )
            p99 = pct(lat["sidecar"], 0.99)
            rows.append(
                (
                    "  ... sidecar p99 through Envoy, concurrency 1",
                    f"{p99 / 1000:.2f} ms",
                    "< 2 ms",
                    p99 < 2000,
                )
            )

    flat = decision_flatness()
    rows.append(("decision cost, 100,000 rules vs 10 (in-process)", f"{flat:.2f}x", "<= 1.5x", flat <= 1.5))
    if not args.quick:
        out = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "policy_load.py")], capture_output=True, text=True, cwd=ROOT
        ).stdout
        for fmt, goal in (("YAML", 5.0), ("JSON", 2.0)):
            m = re.search(rf"{fmt}: serving in\s+([\d.]+) s \(median of \d+, ([\d.-]+) s;.*?= ([\d.]+)x", out)
            if m:
                t, spread, x = float(m[1]), m[2], float(m[3])
                rows.append(
                    (
                        f"100,000-rule policy from {fmt}: until serving",
                        f"{t:.2f} s ({spread})",
                        f"<= {goal:.0f} s",
                        t <= goal,
                    )
                )
                rows.append(
                    (f"  ... RSS growth over the policy's own heap ({fmt})", f"{x:.2f}x", "<= 2x", x <= 2)
                )

    width = max(len(r[0]) for r in rows)
    print(
        f"\nmake bench: {args.rounds} alternating round(s) of {args.seconds:.0f} s, h2load -c 4 -m 8, one allowed Check"
    )
    print(f"{'goal':{width}}  {'measured':38} {'target':9} result")
    for name, measured, target, ok in rows:
        print(f"{name:{width}}  {measured:38} {target:9} {'met' if ok else 'MISSED'}")
    for n in notes:
        print("  " + n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
