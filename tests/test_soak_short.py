"""A shortened soak (bench/soak.py for ~4 s): a steady mix of allow, step-up, deny and bad-token
Checks from gRPC and HTTP callers against `python -m sidecar serve` gives zero errors and zero
wrong decisions, and memory stays flat."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import ROOT


def test_short_soak_has_no_errors_and_no_wrong_decisions() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak.py"),
            "--duration",
            "4",
            "--concurrency",
            "8",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-2000:]
    fields = dict(re.findall(r"^  (\w+)\s+(\S+)$", out, re.MULTILINE))
    assert fields["errors"] == "0" and fields["wrong_decisions"] == "0"
    assert int(fields["calls"]) > 1000
    growth_kib = int(fields["rss_kib_end"]) - int(fields["rss_kib_start"])
    assert growth_kib < 20 * 1024, out
