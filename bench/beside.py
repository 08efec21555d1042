"""What deciding beside the answer costs per Check: a candidate policy, and shadow rules, as
ratios to the same Check path with neither, measured in the same process, interleaved round by
round (machines are noisy).

The path is the server's own (`AuthorizationServicer.check_bytes`: parse, attributes, decide,
response bytes, metrics, the decision line to /dev/null), for an allowed transfer with a cached
token, and a step-up. The candidate is the example policy with transfers made `critical` (so it
disagrees on the allowed call: the disagreement is counted and logged, the dearer case).

    python bench/beside.py [--rounds 9] [--n 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.compiler import load_policy_text  # noqa: E402
from sidecar.keys import KeyStore  # noqa: E402
from sidecar.runtime import Runtime  # noqa: E402
from sidecar.server import AuthorizationServicer  # noqa: E402
from sidecar.telemetry import LineWriter, Metrics, Telemetry  # noqa: E402
from tests.helpers import ACR_PHR, EXAMPLE_POLICY, check_request, example_policy_text, make_token  # noqa: E402

TIGHTER = ('"POST /v1/transfers"], level: high', '"POST /v1/transfers"], level: critical')
SENS = "    - {id: admin, match:"
SHADOWS = [
    f'    - {{id: s-transfer, match: ["/bank.v1.Payments/Transfer"], level: critical, mode: shadow}}\n{SENS}',
    f'    - {{id: s-balance, match: ["/bank.v1.Accounts/GetBalance"], level: high, mode: shadow}}\n{SENS}',
    f'    - {{id: s-admin, match: ["/bank.v1.Admin/Audit"], level: high, mode: shadow}}\n{SENS}',
    f'    - {{id: s-accounts, match: ["/bank.v1.Accounts/List"], level: critical, mode: shadow}}\n{SENS}',
]


def servicer(text: str, candidate: str | None, devnull: int) -> AuthorizationServicer:
    keys = KeyStore()
    policy = load_policy_text(text, base_dir=EXAMPLE_POLICY.parent, keys=keys)
    tel = Telemetry(None, decision_log=LineWriter(devnull), metrics=Metrics())
    rt = Runtime(policy, tel, keys=keys)
    if candidate is not None:
        rt.swap_candidate(load_policy_text(candidate, base_dir=EXAMPLE_POLICY.parent, keys=keys))
    return AuthorizationServicer(rt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    devnull = os.open(os.devnull, os.O_WRONLY)
    base = example_policy_text()
    subjects = {
        "none": servicer(base, None, devnull),
        "candidate": servicer(base, example_policy_text(TIGHTER).replace("name: bank-demo", "name: next"), devnull),
        "1 shadow rule": servicer(example_policy_text((SENS, SHADOWS[0])), None, devnull),
        "4 shadow rules": servicer(example_policy_text((SENS, "".join(s[: -len(SENS)] for s in SHADOWS) + SENS)), None, devnull),
    }
    now = time.time()
    hdrs = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "x-request-id": "r-1"}
    calls = {
        "allow (transfer, phr)": check_request(
            "/bank.v1.Payments/Transfer", token=make_token(now=now, acr=ACR_PHR, exp=int(now) + 3600), headers=hdrs
        ).SerializeToString(),
        "step-up (transfer, pwd)": check_request(
            "/bank.v1.Payments/Transfer", token=make_token(now=now, exp=int(now) + 3600), headers=hdrs
        ).SerializeToString(),
    }
    loop = asyncio.new_event_loop()

    async def many(s: AuthorizationServicer, raw: bytes, n: int) -> None:
        for _ in range(n):
            await s.check_bytes(raw, None)

    print(f"median µs per Check over {args.rounds} interleaved rounds of {args.n}; ratio to 'none' per round")
    for call, raw in calls.items():
        per: dict[str, list[float]] = {k: [] for k in subjects}
        for s in subjects.values():
            loop.run_until_complete(many(s, raw, 200))  # warm: token cached, memos filled
        for _ in range(args.rounds):
            for name, s in subjects.items():
                t0 = time.perf_counter()
                loop.run_until_complete(many(s, raw, args.n))
                per[name].append((time.perf_counter() - t0) / args.n * 1e6)
        print(f"\n{call}")
        for name, xs in per.items():
            ratios = [x / b for x, b in zip(xs, per["none"], strict=True)]
            print(f"  {name:16} {statistics.median(xs):6.1f} µs   {statistics.median(ratios):.2f}x of none"
                  f" ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
