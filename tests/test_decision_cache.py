"""The engine's cache of allowed decisions (Engine.decide) never answers otherwise than deciding
afresh: a differential against an engine without it over sequences that revisit requests at
instants on both sides of every time boundary (token expiry, not-before, freshness, hours), and
targeted tests of each boundary, of revoked keys, of a reload, of the trailing-slash double
reading, of what is never remembered, and of the request attributes the tables may read."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.attributes import RequestAttributes, from_check_request
from sidecar.compiler import load_policy_text
from sidecar.engine import Engine
from sidecar.tokens import Verifier
from tests.helpers import (
    ACR_1FA,
    ACR_2FA,
    ACR_PHR,
    ACR_PHRH,
    NOW,
    check_request,
    example_policy_text,
    make_token,
)

BALANCE = "/bank.v1.Accounts/GetBalance"
TRANSFER = "/bank.v1.Payments/Transfer"
LIST = "/bank.v1.Accounts/List"
ADMIN = "/bank.v1.Admin/SetPermissions"
LEDGER = "spiffe://cluster.local/ns/bank/sa/ledger"

# The example policy with its device and hours rules switched on. NOW is Friday 2027-01-15,
# 09:00 in Berlin: the window 07:00-20:00 ends at NOW + 11 h and began at NOW - 2 h.
RISKY = example_policy_text(
    ("  # - id: unknown-device\n", "  - id: unknown-device\n"),
    ("  #   when: {device_unknown:", "    when: {device_unknown:"),
    ("  #   raise: 1\n  # - id: off-hours\n", "    raise: 1\n  - id: off-hours\n"),
    ("  #   when: {outside_hours:", "    when: {outside_hours:"),
    ("  #   raise: 1\n  #   max_age: 15m\n", "    raise: 1\n    max_age: 15m\n"),
)
WINDOW_END = NOW + 11 * 3600
WINDOW_START = NOW - 2 * 3600
assert dt.datetime.fromtimestamp(WINDOW_END, dt.UTC).hour == 19  # 20:00 in Berlin (CET)


def _claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


TOKENS = [
    make_token(),  # teller, aal1, exp NOW+600
    make_token(acr=ACR_PHR, exp=NOW + 7200, auth_time=NOW - 3000),  # transfer fresh until NOW+660
    make_token(sub="root", roles=["admin", "teller"], acr=ACR_PHRH, auth_time=NOW - 100, exp=NOW + 50_000),
    make_token(nbf=NOW + 100, exp=NOW + 5000),  # not valid before NOW+40 (60 s skew)
    make_token(sub="carol", roles=["customer"], acr=ACR_2FA, auth_time=NOW - 1000, exp=NOW + 45_000),
    make_token(sub="bob", acr=ACR_PHR, auth_time=NOW, exp=NOW + 100_000, amr=["hwk", "pin"]),
    make_token(sub="dave", acr=ACR_1FA, drop=("auth_time",), exp=NOW + 9000),
]
OFFSETS = [
    -7201, -7200.5, -7200, -100, -60, 0, 39, 40, 40.5, 41, 99, 100, 161, 599, 600, 659, 660, 660.5, 661,
    700, 840, 900, 960, 1000, 3000, 3540, 3600, 3660, 4000, 39_599, 39_599.5, 39_600, 39_601, 45_060,
    45_061, 50_000, 100_000,
]  # fmt: skip


def _request(path: str, method: str, cred: tuple[str, int] | None, source: str, device: str | None,
             principal: str, ext: str | None) -> RequestAttributes:  # fmt: skip
    headers = {"x-device-id": device} if device is not None else {}
    token = TOKENS[cred[1]] if cred is not None and cred[0] == "bearer" else None
    jwt_payload = _claims(TOKENS[cred[1]]) if cred is not None and cred[0] == "jwt_authn" else None
    return from_check_request(
        check_request(
            path, method=method, token=token, headers=headers, source=source, principal=principal,
            jwt_payload=jwt_payload, context_extensions={"sensitivity": ext} if ext else None,
        )
    )  # fmt: skip


OPERATIONS = [(BALANCE, "POST"), (TRANSFER, "POST"), (LIST, "POST"), (ADMIN, "POST"),
              ("/v1/accounts/7/balance", "GET"), ("/v1/accounts/7/balance/", "GET"), ("/v1/accounts/7/history", "GET"),
              ("/healthz", "GET")]  # fmt: skip
CREDENTIALS = [None, *[("bearer", i) for i in range(len(TOKENS))], *[("jwt_authn", i) for i in (0, 1, 3, 4)]]


@st.composite
def requests(draw: Any) -> RequestAttributes:
    path, method = draw(st.sampled_from(OPERATIONS))
    return _request(
        path,
        method,
        draw(st.sampled_from(CREDENTIALS)),
        draw(st.sampled_from(["127.0.0.1", "203.0.113.5"])),
        draw(st.sampled_from([None, "laptop-7f3a", "other"])),
        draw(st.sampled_from(["", "", LEDGER])),
        draw(st.sampled_from([None, None, "high", "critical", "nonsense"])),
    )


def _engines(text: str = RISKY, cache_size: int = 4096) -> tuple[Engine, Engine]:
    """(with the cache, without): each its own policy, identity memo and token cache."""
    return (
        Engine(load_policy_text(text), Verifier(), cache_size=cache_size),
        Engine(load_policy_text(text), Verifier(), cache_size=0),
    )


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(
    pool=st.lists(requests(), min_size=1, max_size=4),
    steps=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(OFFSETS)), min_size=1, max_size=30),
)
def test_cached_decisions_are_the_decisions_made_afresh(pool: list[RequestAttributes], steps: list[Any]) -> None:
    """Requests revisited at instants before and after each boundary: the same Decision (every
    field: outcome, reason, rules, requirement, identity, challenge) with and without the cache."""
    cached, fresh = _engines()
    for i, offset in steps:
        a = pool[i % len(pool)]
        assert cached.decide(a, NOW + offset) == fresh.decide(a, NOW + offset), (a, offset)


def test_the_differential_reuses_entries() -> None:
    """(Not vacuous: a revisited allowed request is answered from the cache.)"""
    cached, fresh = _engines()
    a = _request(BALANCE, "POST", ("bearer", 0), "127.0.0.1", "laptop-7f3a", "", None)
    for offset in (0, 1, 2):
        assert cached.decide(a, NOW + offset) == fresh.decide(a, NOW + offset)
    assert cached.decide(a, NOW).reason == "allowed" and cached.cache_hits == 3


def _at(engine: Engine, a: RequestAttributes, *offsets: float) -> list[str]:
    return [engine.decide(a, NOW + o).reason for o in offsets]


def test_an_expired_token_is_refused_although_its_decision_was_remembered() -> None:
    cached, _ = _engines()
    a = _request(BALANCE, "POST", ("bearer", 0), "127.0.0.1", "laptop-7f3a", "", None)  # exp NOW+600
    assert _at(cached, a, 0, 660, 660.5) == ["allowed", "allowed", "token_expired"]
    assert cached.cache_hits == 1


def test_expired_jwt_authn_claims_are_refused_although_the_decision_was_remembered() -> None:
    cached, _ = _engines()
    a = _request(BALANCE, "POST", ("jwt_authn", 0), "127.0.0.1", "laptop-7f3a", "", None)
    assert _at(cached, a, 0, 660, 661) == ["allowed", "allowed", "token_expired"]
    assert cached.cache_hits == 1


def test_a_login_that_grew_too_old_steps_up_although_the_decision_was_remembered() -> None:
    cached, _ = _engines()
    a = _request(TRANSFER, "POST", ("bearer", 1), "127.0.0.1", "laptop-7f3a", "", None)  # 1 h, auth NOW-3000
    assert _at(cached, a, 0, 660, 660.5) == ["allowed", "allowed", "auth_too_old"]
    d = cached.decide(a, NOW + 661)
    assert (d.outcome.value, d.max_age) == ("step_up", 3600)


def test_a_risk_rule_that_starts_firing_is_seen_although_the_decision_was_remembered() -> None:
    """The hours rule fires from 20:00 in Berlin: a balance remembered as allowed at 19:59:59.5
    steps up at 20:00 (the rule's 15 minutes), and an admin's stays allowed but names the rule."""
    cached, _ = _engines()
    carol = _request(BALANCE, "POST", ("bearer", 4), "127.0.0.1", "laptop-7f3a", "", None)  # aal2, auth NOW-1000
    assert [cached.decide(carol, WINDOW_END - o).reason for o in (1, 0.5)] == ["allowed", "allowed"]
    assert cached.cache_hits == 1
    later = cached.decide(carol, WINDOW_END)
    assert (later.reason, later.max_age) == ("auth_too_old", 900) and "off-hours" in later.matched_rules
    token = make_token(sub="root", acr=ACR_PHRH, now=WINDOW_END - 60, exp=WINDOW_END + 3600)  # aal3, fresh
    root = from_check_request(check_request(BALANCE, token=token, headers={"x-device-id": "laptop-7f3a"}))
    before, after = cached.decide(root, WINDOW_END - 0.5), cached.decide(root, WINDOW_END)
    assert before.reason == after.reason == "allowed"
    assert "off-hours" not in before.matched_rules and "off-hours" in after.matched_rules
    assert cached.decide(root, WINDOW_END + 1) is after  # (each remembered under its own key)


def test_a_time_before_not_before_is_refused_although_the_decision_was_remembered() -> None:
    cached, _ = _engines()
    a = _request(BALANCE, "POST", ("bearer", 3), "127.0.0.1", "laptop-7f3a", "", None)  # nbf NOW+100
    assert _at(cached, a, 100, 40, 39.5) == ["allowed", "allowed", "token_not_yet_valid"]


def test_a_request_from_elsewhere_is_decided_for_where_it_comes_from() -> None:
    cached, _ = _engines()
    inside = _request(LIST, "POST", ("bearer", 4), "127.0.0.1", "laptop-7f3a", "", None)
    outside = _request(LIST, "POST", ("bearer", 4), "203.0.113.5", "laptop-7f3a", "", None)
    unknown_device = _request(LIST, "POST", ("bearer", 4), "127.0.0.1", "other", "", None)
    raised = _request(LIST, "POST", ("bearer", 4), "127.0.0.1", "laptop-7f3a", "", "high")
    assert cached.decide(inside, NOW).reason == "allowed"
    assert cached.decide(outside, NOW).reason == "acr_too_low"
    assert cached.decide(unknown_device, NOW).reason == "acr_too_low"
    assert cached.decide(raised, NOW).reason == "acr_too_low"
    assert cached.decide(inside, NOW).reason == "allowed" and cached.cache_hits == 1


def test_a_trailing_slash_is_decided_under_both_readings_each_time() -> None:
    """`/x/` is allowed only where `/x` is too: the second reading's stricter freshness must
    hold on every call (a remembered decision would carry only the first reading's)."""
    text = example_policy_text(
        ("    - {id: health,", "    - {id: slash, match: [\"GET /v1/x/\"], level: personal}\n"
         "    - {id: noslash, match: [\"GET /v1/x\"], level: high}\n    - {id: health,"),
        ("  - id: tellers-read\n", "  - id: x\n    match: [\"GET /v1/x\", \"GET /v1/x/\"]\n"
         "    allow: {roles: [teller]}\n  - id: tellers-read\n"),
    )  # fmt: skip
    cached, fresh = _engines(text)
    a = _request("/v1/x/", "GET", ("bearer", 1), "127.0.0.1", None, "", None)  # phr, auth NOW-3000
    for offset in (0, 600, 661, 700):
        assert cached.decide(a, NOW + offset) == fresh.decide(a, NOW + offset)
    assert _at(cached, a, 0, 661) == ["allowed", "auth_too_old"]


def test_refusals_public_calls_and_problem_requests_are_never_remembered() -> None:
    cached, _ = _engines()
    for a in (
        _request(ADMIN, "POST", ("bearer", 0), "127.0.0.1", "laptop-7f3a", "", None),  # permission_denied
        _request(TRANSFER, "POST", ("bearer", 0), "127.0.0.1", "laptop-7f3a", "", None),  # step-up
        _request("/healthz", "GET", ("bearer", 0), "127.0.0.1", None, "", None),  # public
        _request("/healthz", "GET", None, "127.0.0.1", None, "", None),  # public
        _request("/nowhere", "GET", ("bearer", 0), "127.0.0.1", None, "", None),  # no rule
    ):
        cached.decide(a, NOW)
        cached.decide(a, NOW)
    problem = dataclasses.replace(
        _request(BALANCE, "POST", ("bearer", 0), "127.0.0.1", "laptop-7f3a", "", None), header_problem="x"
    )
    assert cached.decide(problem, NOW).reason == "invalid_header"
    assert len(cached._cache) == 0 and cached.cache_hits == 0


def test_a_workload_grant_is_remembered_for_its_principal_only() -> None:
    cached, fresh = _engines()
    ledger = _request(BALANCE, "POST", None, "127.0.0.1", "laptop-7f3a", LEDGER, None)
    other = _request(BALANCE, "POST", None, "127.0.0.1", "laptop-7f3a", LEDGER + "x", None)
    assert _at(cached, ledger, 0, 1) == ["workload_granted", "workload_granted"] and cached.cache_hits == 1
    assert cached.decide(other, NOW) == fresh.decide(other, NOW)
    assert cached.decide(other, NOW).reason == "missing_credential"


def test_the_cache_is_bounded() -> None:
    cached, _ = _engines(cache_size=3)
    for i in range(10):
        cached.decide(_request(f"/v1/accounts/{i}/balance", "GET", ("bearer", 0), "127.0.0.1", "laptop-7f3a", "", None), NOW)
    assert len(cached._cache) == 3


def test_a_revoked_key_stops_a_remembered_decision(tmp_path: Path) -> None:
    from sidecar.keys import RemoteKeys
    from tests.helpers import PRIVATE_JWK
    from tests.test_keys_and_reload import ROTATED, FakeIdP, _public, _runtime_with_url

    idp = FakeIdP(_public(PRIVATE_JWK))
    runtime, _ = _runtime_with_url(tmp_path, idp)
    request = check_request(BALANCE, token=make_token())

    def reason() -> str:
        return asyncio.run(runtime.evaluate(request)).decision.reason

    assert [reason(), reason()] == ["allowed", "allowed"] and runtime.engine.cache_hits == 1
    remote = runtime.policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    idp.keys = [_public(ROTATED.as_dict(private=False))]  # the IdP drops the key
    remote._last_attempt = float("-inf")
    assert remote.refresh() is True
    assert reason() == "unknown_key"


class _Reads:
    """RequestAttributes that record which fields are read (headers: which names)."""

    def __init__(self, a: RequestAttributes) -> None:
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name: str) -> Any:
        self.read.add(name)
        value = getattr(self._a, name)
        if name == "headers":
            reads = self.read

            class H(dict):  # type: ignore[type-arg]
                def get(self, k: Any, default: Any = None) -> Any:
                    reads.add(f"headers[{k}]")
                    return super().get(k, default)

                def __getitem__(self, k: Any) -> Any:
                    reads.add(f"headers[{k}]")
                    return super().__getitem__(k)

                def __contains__(self, k: Any) -> bool:
                    reads.add(f"headers[{k}]")
                    return super().__contains__(k)

            return H(value)
        return value


def test_the_tables_read_only_what_the_cache_key_and_its_checks_cover() -> None:
    """Every attribute the decision reads is in the key, re-checked on a hit (the credential,
    through the identity), or read by a risk rule (whose firing is in the key). A new read here
    must join the key in Engine.decide."""
    key_or_checked = {
        "method", "path", "principal", "bearer", "jwt_authn", "context_extensions",  # the key
        "path_error", "header_problem", "method_override", "auth_problem",  # never remembered
    }  # fmt: skip
    risk_reads = {"source_ip", "headers", "headers[x-device-id]"}
    _, fresh = _engines()
    seen: set[str] = set()
    for path, method in OPERATIONS:
        for cred in CREDENTIALS:
            for ext in (None, "high"):
                r = _Reads(_request(path, method, cred, "203.0.113.5", "other", LEDGER, ext))
                for offset in (0, 40_000):
                    fresh._decide(r, NOW + offset, None)  # type: ignore[arg-type]
                seen |= r.read
    assert seen - key_or_checked - risk_reads == set()
    assert "jwt_authn" in seen and "source_ip" in seen  # (the corpus reaches them)


def test_a_decision_for_a_huge_credential_is_not_remembered() -> None:
    """(Bounded memory: 4096 entries of at most ~8 KB of key each.)"""
    cached, fresh = _engines()
    claims = {**_claims(TOKENS[0]), "pad": "x" * 9000}
    a = from_check_request(check_request(BALANCE, jwt_payload=claims, headers={"x-device-id": "laptop-7f3a"}))
    assert cached.decide(a, NOW) == fresh.decide(a, NOW)
    assert cached.decide(a, NOW).reason == "allowed" and len(cached._cache) == 0
    claims["pad"] = "x" * 10
    a = from_check_request(check_request(BALANCE, jwt_payload=claims, headers={"x-device-id": "laptop-7f3a"}))
    assert cached.decide(a, NOW).reason == "allowed" and len(cached._cache) == 1


def test_a_stale_hit_checks_the_signature_once() -> None:
    """(red-team helper-13) The key set changed under a remembered decision: the identity worked
    out on the hit path is the one the decision is then made with, not worked out again."""
    from joserfc.jwk import KeySet, RSAKey

    from tests.helpers import PRIVATE_JWK

    verifier = Verifier()
    policy = load_policy_text(example_policy_text())
    engine = Engine(policy, verifier)
    a = from_check_request(check_request(token=make_token()))
    assert [engine.decide(a, NOW).reason, engine.decide(a, NOW + 1).reason] == ["allowed", "allowed"]
    before, hits = verifier.verifications, verifier.hits
    other = RSAKey.generate_key(2048, parameters={"kid": PRIVATE_JWK["kid"], "alg": "RS256", "use": "sig"})
    policy.issuers[0].keys._keys = KeySet([RSAKey.import_key(other.as_dict(private=False))])  # type: ignore[union-attr]
    assert engine.decide(a, NOW + 2).reason == "bad_signature"
    assert (verifier.verifications - before, verifier.hits - hits) == (1, 0)


def test_requests_nobody_can_be_remembered_for_never_run_the_risk_rules_for_the_key() -> None:
    """(red-team helper-13) Without a credential, or with one that does not verify, a request
    costs what deciding it costs: no risk rule is evaluated for a cache key (the network rule's
    verdicts are not filled by unauthenticated sources), and the cache stays empty."""
    from sidecar.risk import SourceNotIn

    cached, _ = _engines()
    rule = next(r.condition for r in cached.policy.risk_rules if isinstance(r.condition, SourceNotIn))
    forged = TOKENS[0][:-8] + "AAAAAAAA"
    for i in range(50):
        for token in (None, forged):
            a = from_check_request(check_request(BALANCE, token=token, source=f"2001:db8::{i:x}"))
            assert cached.decide(a, NOW).reason in ("missing_credential", "bad_signature")
    assert rule._inside.cache_info().currsize == 0 and len(cached._cache) == 0


def test_what_the_edges_derive_from_a_decision_is_remembered_only_for_remembered_decisions() -> None:
    """(red-team helper-13) Denials and public allows (new Decision objects every call) leave
    nothing behind in the telemetry's and the response builder's per-decision memos; a
    remembered allow leaves one entry in each, whatever the number of calls."""
    import io

    from sidecar import response
    from sidecar.runtime import Runtime
    from sidecar.server import AuthorizationServicer
    from sidecar.telemetry import Metrics, Telemetry

    telemetry = Telemetry(None, decision_log=io.StringIO(), metrics=Metrics())
    runtime = Runtime(load_policy_text(RISKY), telemetry, lambda: NOW)
    servicer = AuthorizationServicer(runtime)
    response._BY_DECISION.clear()

    def check(path: str, method: str = "POST", token: str | None = None) -> None:
        data = check_request(path, method=method, token=token, headers={"x-device-id": "laptop-7f3a"})
        asyncio.run(servicer.check_bytes(data.SerializeToString(), None))

    for i in range(20):
        check(f"/nowhere/{i}" + "x" * 2000)  # no rule
        check("/healthz", "GET")  # public
        check(ADMIN, token=TOKENS[0])  # permission denied
    assert len(telemetry._static) == 0 and len(response._BY_DECISION) == 0
    for _ in range(5):
        check(BALANCE, token=TOKENS[0])
    assert len(telemetry._static) == 1 and len(response._BY_DECISION) == 1
    assert runtime.engine.cache_hits == 4


def test_a_dead_credential_replayed_runs_no_risk_rule_and_drops_its_entry() -> None:
    """(red-team helper-14) A token that was allowed once and then expired, replayed from many
    peers: refused without running a risk rule (the network rule's verdicts stay the real
    clients'), and its remembered decisions are gone."""
    from sidecar.risk import SourceNotIn

    cached, fresh = _engines()
    rule = next(r.condition for r in cached.policy.risk_rules if isinstance(r.condition, SourceNotIn))
    ok = _request(BALANCE, "POST", ("bearer", 0), "127.0.0.1", "laptop-7f3a", "", None)  # exp NOW+600
    assert cached.decide(ok, NOW).reason == "allowed" and len(cached._cache) == 1
    filled = rule._inside.cache_info().currsize
    for i in range(50):
        a = _request(BALANCE, "POST", ("bearer", 0), f"2001:db8::{i:x}", "laptop-7f3a", "", None)
        assert cached.decide(a, NOW + 700) == fresh.decide(a, NOW + 700)
        assert cached.decide(a, NOW + 700).reason == "token_expired"
    assert rule._inside.cache_info().currsize == filled and len(cached._cache) == 0


def test_the_bound_counts_decisions_not_keys() -> None:
    """(red-team helper-14) One caller under every combination of risk rules on many paths: at
    most `cache_size` decisions are held, however they are spread over keys."""
    cached, fresh = _engines(cache_size=5)
    token = make_token(sub="root", roles=["teller"], acr=ACR_PHRH, now=NOW, exp=NOW + 100_000)
    for i in range(12):
        for source in ("127.0.0.1", "203.0.113.5"):
            for device in ("laptop-7f3a", "other"):
                r = check_request(f"/v1/accounts/{i}/balance", method="GET", token=token, source=source,
                                  headers={"x-device-id": device})  # fmt: skip
                a = from_check_request(r)
                assert cached.decide(a, NOW + 30) == fresh.decide(a, NOW + 30)
                held = sum(len(v) for v in cached._cache.values())
                assert held == cached._entries <= 5
    assert 0 < cached._entries <= 5 and cached.cache_hits == 0


def test_hits_and_misses_are_counted_for_operators_across_reloads() -> None:
    """stepup_decision_cache_total{result}: of the Checks the cache could answer (a credential,
    no problem), how many it did; counts carry over a reload (a new, empty cache)."""
    from sidecar.runtime import Runtime
    from sidecar.telemetry import Metrics, Telemetry

    metrics = Metrics()
    runtime = Runtime(load_policy_text(RISKY), Telemetry(None, decision_log=None, metrics=metrics), lambda: NOW)

    def check(token: str | None) -> str:
        request = check_request(BALANCE, token=token, headers={"x-device-id": "laptop-7f3a"})
        return asyncio.run(runtime.evaluate(request)).decision.reason

    def counted() -> tuple[float | None, float | None]:
        metrics.sync(runtime.verifier, {"active": runtime.policy}, runtime.decision_cache_counts)
        get = metrics.registry.get_sample_value
        return (get("stepup_decision_cache_total", {"result": "hit"}),
                get("stepup_decision_cache_total", {"result": "miss"}))  # fmt: skip

    assert [check(TOKENS[0]) for _ in range(3)] + [check(None)] == ["allowed"] * 3 + ["missing_credential"]
    assert counted() == (2, 1)
    runtime.swap(load_policy_text(RISKY))
    assert [check(TOKENS[0]) for _ in range(2)] == ["allowed"] * 2
    assert counted() == (3, 2)


def test_huge_jwt_authn_metadata_is_not_even_made_into_a_key() -> None:
    """(red-team helper-15) Over the key cap by its wire size, the claims are never repr()'d for
    a key (1.6 MB of metadata cost 15% more per Check)."""

    class NoRepr(dict):  # type: ignore[type-arg]
        def __repr__(self) -> str:
            raise AssertionError("repr() of metadata over the cap")

    cached, fresh = _engines()
    claims = {**_claims(TOKENS[0]), "pad": "x" * 5000}
    a = from_check_request(check_request(BALANCE, jwt_payload=claims, headers={"x-device-id": "laptop-7f3a"}))
    assert a.jwt_authn_bytes > 4096
    a = dataclasses.replace(a, jwt_authn=NoRepr(a.jwt_authn))
    assert cached.decide(a, NOW) == fresh.decide(a, NOW)
    assert cached.decide(a, NOW).reason == "allowed" and len(cached._cache) == 0
