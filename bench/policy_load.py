"""Policy load at scale (the perf issue): a generated 100,000-rule policy, as YAML and as JSON.

For each: seconds from `stepup-sidecar serve` starting to SERVING (health), the server's RSS then,
and, for reference, the heap the compiled policy itself holds (tracemalloc, in this process) and
the RSS of a server with the 10-rule example policy. Goals: YAML <= 5 s, JSON <= 2 s, RSS growth
over the example <= 2x the policy's own heap.

    python bench/policy_load.py [--rules 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decide import generated_policy  # noqa: E402
from examples.stack import free_port, health_status  # noqa: E402
from tests.helpers import EXAMPLE_POLICY  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def serve_time(policy: Path) -> tuple[float, float]:
    listen = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", listen,
         "--decision-log", "off", "--watch-interval", "0", "--log-level", "error"],
        cwd=ROOT,
    )  # fmt: skip
    try:
        while health_status(listen, timeout=0.2) != 1:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        time.sleep(0.5)
        return elapsed, rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def policy_heap_mib(policy: Path) -> float:
    from sidecar.compiler import load_policy

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    p = load_policy(policy)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del p
    return (after - before) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3, help="serves of each format, alternating (median reported)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        yml = generated_policy(args.rules, Path(tmp))
        js = Path(tmp) / "generated.json"
        js.write_text(json.dumps(yaml.safe_load(yml.read_text())))
        base_t, base_rss = serve_time(EXAMPLE_POLICY)
        heap = policy_heap_mib(js)
        formats = (("YAML", yml, 5.0), ("JSON", js, 2.0))
        times: dict[str, list[float]] = {name: [] for name, _, _ in formats}
        rss_of: dict[str, float] = {}
        for _ in range(args.runs):  # alternating, so that a slow spell of the machine hits both
            for name, path, _ in formats:
                t, rss_of[name] = serve_time(path)
                times[name].append(t)
        rows = [(name, statistics.median(times[name]), goal, rss_of[name]) for name, _, goal in formats]
    print(f"policy load, {args.rules} rules; example policy: serving in {base_t:.2f} s, RSS {base_rss:.0f} MiB")
    print(f"compiled policy's own heap: {heap:.0f} MiB")
    for name, t, goal, rss in rows:
        growth = rss - base_rss
        spread = f"median of {args.runs}, {min(times[name]):.2f}-{max(times[name]):.2f} s; "
        print(
            f"  {name}: serving in {t:5.2f} s ({spread}goal <= {goal:.0f} s: {'met' if t <= goal else 'missed'}),"
            f" RSS {rss:.0f} MiB, growth {growth:.0f} MiB = {growth / heap:.2f}x the policy's heap"
            f" (goal <= 2x: {'met' if growth <= 2 * heap else 'missed'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
