"""Write the fuzzer's seed corpus: serialized CheckRequests, one file each.

    .venv/bin/python -m tests.fuzz.make_seeds [OUT_DIR]      (default .fuzz/seeds, emptied first)

Seeds: every case of tests/data/bypass/*.test.yaml (as the test runner builds it),
a few hand-made requests for each outcome and reason of both fuzzed policies (allow, public,
workload, step-up for strength / freshness / amr, every kind of bad credential, permission and
scope denials, malformed input), the regression corpus, and requests from the structured
generator. The directory is not committed: it is regenerated on every `make fuzz`.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from google.protobuf import struct_pb2  # noqa: E402

from tests.fuzz import generate as g  # noqa: E402
from tests.fuzz.harness import load_regression  # noqa: E402
from tests.helpers import ACR_2FA, ACR_PHR, ACR_PHRH, NOW, check_request, make_token  # noqa: E402

DEFAULT_OUT = ROOT / ".fuzz" / "seeds"
LEDGER = g.LEDGER
GENERATED = 300


def _partner_token(**claims: Any) -> str:
    body = {
        "iss": g.SECOND_ISSUER, "aud": "partner-api", "uid": "carol", "realm_access": {"roles": ["teller"]},
        "acrs": ["gold"], "exp": NOW + 600, "iat": NOW - 10, "auth_time": NOW - 10,
    }  # fmt: skip
    body.update(claims)
    return make_token(drop=("sub", "roles", "scope", "acr", "amr"), **body)


def _partner_metadata() -> Any:
    req = check_request("/v1/partner/report", method="GET", grpc=False)
    st = struct_pb2.Struct()
    st.update({"partner_payload": {"iss": g.SECOND_ISSUER, "aud": "partner-api", "uid": "carol", "exp": NOW + 600,
                                   "realm_access": {"roles": ["teller"]}, "acrs": ["silver"]}})  # fmt: skip
    req.attributes.metadata_context.filter_metadata[g.JWT_AUTHN].CopyFrom(st)
    return req


def by_outcome() -> dict[str, Any]:
    """A few requests for each answer (both policies give most of them)."""
    md = {"iss": "https://idp.example.test", "aud": "bank-api", "sub": "alice", "exp": NOW + 600,
          "auth_time": NOW - 10, "roles": ["teller"], "acr": ACR_PHR}  # fmt: skip
    teller = make_token()
    return {
        "allow-balance": check_request(token=teller),
        "allow-balance-http": check_request("/v1/accounts/7/balance", method="GET", token=teller, grpc=False),
        "allow-transfer-phr": check_request("/bank.v1.Payments/Transfer", token=make_token(acr=ACR_PHR)),
        "allow-admin-phrh": check_request(
            "/v1/admin/users", method="GET", grpc=False, token=make_token(sub="root", roles=["admin"], acr=ACR_PHRH)
        ),
        "allow-jwt-authn": check_request("/bank.v1.Payments/Transfer", jwt_payload={**md, "scope": "payments"}),
        "allow-known-device": check_request(token=teller, headers={"x-device-id": "laptop-7f3a"}, source="10.1.2.3"),
        "allow-partner": check_request("/v1/partner/report", method="GET", grpc=False, token=_partner_token()),
        "allow-partner-metadata": _partner_metadata(),
        "public-healthz": check_request("/healthz", method="GET", grpc=False),
        "public-docs": check_request("/docs/intro", method="GET", grpc=False),
        "workload-ledger": check_request(principal=LEDGER),
        "workload-batch": check_request("/bank.v1.Accounts/ListAccounts", principal=g.BATCH + "7"),
        "workload-anyone": check_request("/v1/accounts/7/history/2024", method="GET", principal=LEDGER),
        "stepup-acr": check_request("/bank.v1.Payments/Transfer", token=teller),
        "stepup-age": check_request(
            "/bank.v1.Payments/Transfer", token=make_token(acr=ACR_PHR, auth_time=NOW - 7200)
        ),
        "stepup-amr": check_request(
            "/v1/accounts/7/statements", method="GET", grpc=False, token=make_token(acr=ACR_2FA, amr=["pwd"])
        ),
        "stepup-untrusted-network": check_request(token=teller, source="203.0.113.9"),
        "stepup-device": check_request(token=teller, headers={"x-device-id": "phone-1"}),
        "stepup-context-extension": check_request(token=teller, context_extensions={"sensitivity": "critical"}),
        "unknown-sensitivity": check_request(token=teller, context_extensions={"sensitivity": "nope"}),
        "missing-credential": check_request(),
        "expired": check_request(token=make_token(exp=NOW - 3600)),
        "not-yet-valid": check_request(token=make_token(nbf=NOW + 3600)),
        "bad-signature": check_request(token=teller[:-4] + "AAAA"),
        "unknown-key": check_request(token=make_token(header={"kid": "other"})),
        "wrong-audience": check_request(token=make_token(aud="other")),
        "unknown-issuer": check_request(token=make_token(iss="https://evil.example")),
        "invalid-claim": check_request(token=make_token(roles={"a": 1})),
        "malformed-token": check_request(token="a.b.c"),
        "metadata-invalid-claim": check_request(jwt_payload={**md, "exp": "soon"}),
        "permission-denied": check_request("/bank.v1.Admin/SetPermissions", token=teller),
        "insufficient-scope": check_request("/bank.v1.Payments/Transfer", token=make_token(acr=ACR_PHR, scope="x")),
        "no-matching-rule": check_request("/bank.v1.Unknown/Call", token=teller),
        "invalid-path": check_request("/v1/accounts/%2e%2e/admin", method="GET"),
        "lower-case-method": check_request("/healthz", method="get"),
        "invalid-method": check_request("/healthz", method="G T"),
        "invalid-header": check_request(headers={"x-note": "a\x00b"}),
        "ambiguous": check_request(
            header_map=[("authorization", b"Bearer " + teller.encode()), ("authorization", b"Bearer x")]
        ),
    }


def bypass_cases() -> dict[str, Any]:
    """Every case of the bypass corpus (tests/data/bypass/*.test.yaml), as the runner builds it;
    claims taken as verified become a token signed with the dev key, so the seed verifies."""
    from sidecar.cases import PLACEHOLDER_PREFIX
    from sidecar.policytest import run_suite
    from tests.test_bypass_corpus import CORPUS, policy, suite

    out = {}
    for f in sorted(CORPUS.glob("*.test.yaml")):
        for r in run_suite(suite(f.name), policy(f.name)):
            req = r.request
            for token, claims in r.presets.items():
                assert token.startswith(PLACEHOLDER_PREFIX)
                real = make_token(**{k: v for k, v in claims.items()})
                _replace_token(req, token, real)
            out[f"bypass-{f.stem}-{r.case.name}"] = req
    return out


def _replace_token(req: Any, placeholder: str, token: str) -> None:
    http = req.attributes.request.http
    for k, v in list(http.headers.items()):
        if placeholder in v:
            http.headers[k] = v.replace(placeholder, token)
    for hv in http.header_map.headers:
        if placeholder.encode() in hv.raw_value:
            hv.raw_value = hv.raw_value.replace(placeholder.encode(), token.encode())


def write(out_dir: Path) -> int:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    seeds: dict[str, bytes] = {}
    for name, req in {**by_outcome(), **bypass_cases()}.items():
        seeds[name] = req.SerializeToString()
    regressions = ROOT / "tests" / "data" / "fuzz_regressions"
    for path in sorted(regressions.glob("*.json")):
        seeds[f"regression-{path.stem}"] = load_regression(path)
    r = random.Random(0)
    for i in range(GENERATED):
        seeds[f"generated-{i:03d}"] = g.generate(r).SerializeToString()
    for name, data in seeds.items():
        digest = hashlib.sha1(data).hexdigest()[:10]
        (out_dir / f"{name[:80]}-{digest}").write_bytes(data)
    return len(seeds)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    n = write(out)
    print(f"make_seeds: {n} seeds in {out}")


if __name__ == "__main__":
    main()
