"""In-process decision cost, as ratios against a baseline measured in the same run.

Baseline: parsing the CheckRequest bytes (work the gRPC layer does for any server). Measured:
reading attributes, deciding (cached token), building the response, and the whole Check path with
telemetry (span + decision log + metrics), for the example policy and a generated policy with
100,000 rules. Prints medians in microseconds and ratios to the baseline.

    python bench/decide.py [--rules 100000] [--rounds 7] [--n 2000]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

from sidecar import response  # noqa: E402
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from sidecar.attributes import from_check_request  # noqa: E402
from sidecar.compiler import load_policy  # noqa: E402
from sidecar.engine import Engine  # noqa: E402
from sidecar.policy import Policy  # noqa: E402
from sidecar.server import new_decision_id  # noqa: E402
from sidecar.telemetry import Metrics, Telemetry  # noqa: E402
from tests.helpers import ACR_PHR, EXAMPLE_POLICY, check_request, make_token  # noqa: E402


def median_us(fn: Callable[[], Any], n: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - t0) / n / 1000)
    return statistics.median(samples)


def generated_policy(n_rules: int, tmp: Path) -> Path:
    """n_rules split between sensitivity and permission rules over distinct gRPC services."""
    half = n_rules // 2
    base = EXAMPLE_POLICY.read_text().replace("jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/")
    head, _, _ = base.partition("sensitivity:\n")
    levels = base[base.index("sensitivity:\n") : base.index("  rules:\n")]
    out = [head, levels, "  rules:\n"]
    for i in range(half):
        out.append(f'    - {{id: s{i}, match: ["/gen{i % 97}.v1.Service{i}/*"], level: low}}\n')
    out.append('    - {id: transfer, match: ["/bank.v1.Payments/Transfer"], level: high}\n')
    out.append("permissions:\n")
    for i in range(half):
        out.append(
            f'  - {{id: p{i}, match: ["/gen{i % 97}.v1.Service{i}/*"], allow: {{roles: [role{i % 500}]}}}}\n'
        )
    out.append(
        '  - {id: tx, match: ["/bank.v1.Payments/Transfer"], allow: {roles: [teller], scopes: [payments]}}\n'
    )
    tail = base[base.index("risk:\n") :]
    out.append(tail)
    p = tmp / "generated.yaml"
    p.write_text("".join(out))
    return p


def scenarios(policy: Policy, gen: int) -> dict[str, bytes]:
    """gen: number of generated rules (0 for the example policy); the low-risk call hits the last
    generated service, granted to its role."""
    now = time.time()
    teller = make_token(now=now)
    strong = make_token(now=now, acr=ACR_PHR)
    i = gen // 2 - 1
    svc = f"/gen{i % 97}.v1.Service{i}/Get" if gen else "/bank.v1.Accounts/GetBalance"
    hdrs = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "user-agent": "grpc-go/1.70",
        "x-request-id": "a3f1c6c2-1b1e-4c55-9d6e-3f5c2a8c9e11",
        "x-forwarded-proto": "http",
        "te": "trailers",
    }
    reqs = {
        "allow (low)": check_request(
            svc, token=make_token(now=now, roles=[f"role{i % 500}"]) if gen else teller, headers=hdrs
        ),
        "allow (transfer, phr)": check_request("/bank.v1.Payments/Transfer", token=strong, headers=hdrs),
        "step-up (transfer, pwd)": check_request("/bank.v1.Payments/Transfer", token=teller, headers=hdrs),
        "deny (no rule)": check_request("/nope.v1.X/Y", token=teller, headers=hdrs),
    }
    return {k: v.SerializeToString() for k, v in reqs.items()}


def run(policy: Policy, label: str, n: int, rounds: int, gen: int) -> None:
    engine = Engine(policy, cache_size=0)  # deciding itself (the decision cache: the `cached` column)
    cached = Engine(policy)
    tel_bare = Telemetry(None, decision_log=None, metrics=Metrics())
    tel_full = Telemetry(TracerProvider(), decision_log=io.StringIO(), metrics=Metrics())
    print(f"\n== {label} (policy {policy.version})")
    print(
        f"{'scenario':26} {'parse':>7} {'attrs':>7} {'decide':>7} {'cached':>7} {'resp':>7} {'check':>7}"
        f" {'+otel':>7}  ratio"
    )
    for name, raw in scenarios(policy, gen).items():
        req = external_auth_pb2.CheckRequest.FromString(raw)
        attrs = from_check_request(req)
        now = time.time()
        d = engine.decide(attrs, now)  # warms the token cache

        def check(tel: Telemetry, raw: bytes = raw) -> None:
            r = external_auth_pb2.CheckRequest.FromString(raw)
            start = time.time_ns()
            a = from_check_request(r)
            dd = engine.decide(a, time.time())
            did = new_decision_id()
            if dd.allowed:
                resp = response.allow(dd, did, policy.upstream_headers)
            else:
                resp = response.deny(dd, did, policy.realm, a.is_grpc)
            tel.record(
                decision=dd,
                attrs=a,
                decision_id=did,
                policy_version=policy.version,
                start_ns=start,
                parent=tel.parent(a.headers),
            )
            resp.SerializeToString()

        t_parse = median_us(lambda raw=raw: external_auth_pb2.CheckRequest.FromString(raw), n, rounds)
        t_attrs = median_us(lambda req=req: from_check_request(req), n, rounds)
        t_decide = median_us(lambda attrs=attrs, now=now: engine.decide(attrs, now), n, rounds)
        cached.decide(attrs, now)
        t_cached = median_us(lambda attrs=attrs, now=now: cached.decide(attrs, now), n, rounds)
        if d.allowed:
            t_resp = median_us(
                lambda d=d: response.allow(d, "x", policy.upstream_headers).SerializeToString(),
                n,
                rounds,
            )
        else:
            t_resp = median_us(
                lambda d=d: response.deny(d, "x", policy.realm, True).SerializeToString(), n, rounds
            )
        t_check = median_us(lambda: check(tel_bare), n, rounds)
        t_full = median_us(lambda: check(tel_full), n, rounds)
        print(
            f"{name:26} {t_parse:7.1f} {t_attrs:7.1f} {t_decide:7.1f} {t_cached:7.1f} {t_resp:7.1f} {t_check:7.1f}"
            f" {t_full:7.1f}"
            f"  decide/parse={t_decide / t_parse:.2f} check/parse={t_check / t_parse:.1f}"
            f" +otel/parse={t_full / t_parse:.1f}  [{d.reason}]"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    print(
        "columns: median µs per call; parse = CheckRequest.FromString (baseline);"
        " check = parse+attrs+decide+response+metrics; +otel = check with an SDK span and a decision log line"
    )
    run(load_policy(EXAMPLE_POLICY), "example policy", args.n, args.rounds, gen=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = generated_policy(args.rules, Path(tmp))
        t0 = time.perf_counter()
        policy = load_policy(path)
        load_s = time.perf_counter() - t0
        run(
            policy,
            f"generated policy, {args.rules} rules (loaded in {load_s:.1f} s)",
            args.n,
            args.rounds,
            gen=args.rules,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
