"""Instructions per Check, counted by valgrind's cachegrind: a figure that does not move with the
machine's noise (on a shared 2-core VM, two alternating h2load rounds of the same code differ by
up to 20%; these counts differ by ~1%), for judging a change to the hot path before the
throughput runs.

The allowed, cached Check of `make bench` (its very request: `run.check_body`) is run in-process through the servicer (attributes, decision,
response, decision log to /dev/null, metrics), N times after a warm-up, under cachegrind, for two
values of N; the difference divided by the difference in N is the per-Check figure, free of the
start-up's. Baseline in the same run: what any server does with the same bytes (parse the
CheckRequest, return a constant answer). Also the I1 and D1 cache misses a Check makes in
cachegrind's simulated caches (a proxy for how much of the caches it sweeps).

    python bench/instructions.py [--root DIR ...]   # DIR: another checkout to count too

valgrind (Debian package) is installed when missing. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNTS = (600, 1600)
WARM = 500
EVENTS = ("I refs", "I1 misses", "D1 misses")


def child(mode: str, n: int, body: str) -> None:
    """Runs under valgrind, in the checkout measured: WARM + n Checks of one kind, of the request
    in `body` (`make bench`'s h2load body: a gRPC frame)."""
    sys.path.insert(0, os.getcwd())
    from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2
    from sidecar.compiler import load_policy
    from sidecar.runtime import Runtime
    from sidecar.server import AuthorizationServicer
    from sidecar.telemetry import LineWriter, Metrics, Telemetry, tracer_provider_from_env
    from tests.helpers import EXAMPLE_POLICY

    data = Path(body).read_bytes()[5:]  # (after the frame's flag and length)
    if mode == "bare":
        ok = b""

        def one() -> object:
            external_auth_pb2.CheckRequest.FromString(data)
            return ok

    else:
        metrics = Metrics()
        provider = tracer_provider_from_env(metrics) if mode == "traced" else None
        assert (provider is not None) == (mode == "traced")
        log = LineWriter(os.open(os.devnull, os.O_WRONLY))
        telemetry = Telemetry(provider, decision_log=log, metrics=metrics)
        servicer = AuthorizationServicer(Runtime(load_policy(EXAMPLE_POLICY), telemetry))

        def one() -> object:
            coro = servicer.check_bytes(data, None)
            try:
                coro.send(None)
            except StopIteration as stop:
                return stop.value
            raise AssertionError("check_bytes awaited something")

        answer = external_auth_pb2.CheckResponse.FromString(one())  # type: ignore[arg-type]
        assert answer.status.code == 0, answer  # an allowed call, as in make bench
    for _ in range(WARM + n):
        one()
    if mode == "traced":  # every span exported (and counted) before the end
        assert provider is not None and provider.force_flush(60_000)
        assert not metrics.registry.get_sample_value("stepup_spans_dropped_total")
    os._exit(0)  # (no interpreter teardown in the count)


def count(root: Path, mode: str, body: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in COUNTS:
            out = Path(tmp) / f"{n}.txt"
            subprocess.run(
                ["valgrind", "--tool=cachegrind", "--cache-sim=yes", "--cachegrind-out-file=/dev/null",
                 f"--log-file={out}", sys.executable, str(Path(__file__).resolve()), "--child", mode, str(n), str(body)],
                cwd=root, check=True, env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})},
            )  # fmt: skip
            got: dict[str, int] = {}
            for line in out.read_text().splitlines():
                m = re.match(r"==\d+== (I|I1|D1)\s+(refs|misses):\s+([\d,]+)", line)
                if m:
                    got[f"{m[1]} {m[2]}"] = int(m[3].replace(",", ""))
            totals.append(got)
    span = COUNTS[1] - COUNTS[0]
    return {e: (totals[1][e] - totals[0][e]) / span for e in EVENTS}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    from run import check_body, ensure_tool  # (not in the child: it puts this checkout on the path)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", action="append", default=[], help="another checkout to count too")
    args = ap.parse_args()
    ensure_tool("valgrind", "valgrind")
    body = check_body(Path(tempfile.mkdtemp()))
    bare = count(ROOT, "bare", body)
    print(f"per Check, cachegrind, {COUNTS[1] - COUNTS[0]} Checks counted")
    print(f"{'':34} {'instructions':>12} {'I1 misses':>10} {'D1 misses':>10}")
    print(f"{'baseline: parse, constant answer':34} {bare['I refs']:12,.0f} {bare['I1 misses']:10,.0f} {bare['D1 misses']:10,.0f}")
    rx = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "otlp_receiver.py")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert rx.stdout is not None
        port = json.loads(rx.stdout.readline())["grpc_port"]
        traced = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                  "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_TRACES_SAMPLER": "always_on"}  # fmt: skip
        for root in [ROOT, *map(Path, args.root)]:
            name = str(root)[-22:] if root != ROOT else "sidecar"
            for mode, label, env in (("sidecar", name, None), ("traced", f"{name}, traced", traced)):
                c = count(root, mode, body, env)
                added = c["I refs"] - bare["I refs"]
                print(f"{label:34} {c['I refs']:12,.0f} {c['I1 misses']:10,.0f} {c['D1 misses']:10,.0f}"
                      f"   ({added:,.0f} beyond the baseline)")  # fmt: skip
    finally:
        rx.terminate()
        rx.wait(10)
    print("(traced: every decision sampled and exported over OTLP/gRPC to a live receiver, the")
    print(" export thread's work included; sidecar: this checkout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
