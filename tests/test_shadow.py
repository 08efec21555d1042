"""Shadow rules (`mode: shadow`): evaluated on every Check as if enforced, never changing an
answer, never adding a header, never costing a signature check; where one would have answered
otherwise, the difference is logged, traced and counted. Through a real gRPC server."""

from __future__ import annotations

import base64
import collections
import re
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import json_format

from sidecar.compiler import PolicyError, load_policy_text
from sidecar.policy import Policy
from tests.helpers import (
    ACR_2FA,
    ACR_PHR,
    EXAMPLE_POLICY,
    NOW,
    check_request,
    example_policy_text,
    make_token,
)
from tests.test_server import Running

BALANCE = "/bank.v1.Accounts/GetBalance"
TRANSFER = "/bank.v1.Payments/Transfer"
SENS = "    - {id: admin, match:"
PERMS = "  - id: ledger-service\n"
RISK = "  - id: untrusted-network\n"


def policy(*replacements: tuple[str, str]) -> Policy:
    return load_policy_text(example_policy_text(*replacements), base_dir=EXAMPLE_POLICY.parent)


# Balance as `critical`, written beside the enforced `balance` rule (same pattern): in shadow.
SHADOW_CRITICAL = (SENS, f'    - {{id: balance-critical, match: ["{BALANCE}"], level: critical, mode: shadow}}\n{SENS}')
# Tellers may not transfer without the `payments` scope... proposed: auditors may too.
SHADOW_GRANT = (PERMS, f'  - {{id: auditors-transfer, match: ["{TRANSFER}"], allow: {{roles: [auditor]}}, mode: shadow}}\n{PERMS}')
# A proposed device rule: a call without a known device asks one level more.
SHADOW_DEVICE = (RISK, "  - {id: device, when: {device_unknown: {header: x-device-id}}, raise: 1, mode: shadow}\n" + RISK)
SHADOW_PUBLIC = (SENS, '    - {id: health-low, match: ["GET /healthz"], level: low, mode: shadow}\n' + SENS)


def running(*replacements: tuple[str, str]) -> Iterator[Running]:
    r = Running(policy(*replacements))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def shadowed() -> Iterator[Running]:
    yield from running(SHADOW_CRITICAL, SHADOW_GRANT, SHADOW_DEVICE, SHADOW_PUBLIC)


@pytest.fixture
def plain() -> Iterator[Running]:
    yield from running()


def _answer(resp: Any) -> str:
    """Everything Envoy acts on (status, headers, body, metadata), with the per-call decision id
    blanked out."""
    did = resp.dynamic_metadata.fields["decision_id"].string_value
    assert len(did) == 16
    text = json_format.MessageToJson(resp, sort_keys=True)
    for b64 in re.findall(r'"(C[A-Za-z0-9+/=]{40,})"', text):  # grpc-status-details-bin
        text = text.replace(b64, base64.b64decode(b64).replace(did.encode(), b"-").hex())
    return text.replace(did, "-")


def _count(r: Running, rule: str, would: str) -> float:
    v = r.metrics.registry.get_sample_value("stepup_shadow_disagreements_total", {"rule": rule, "would": would})
    return v or 0.0


REQUESTS = [
    # (name, request) — each is answered the same with and without the shadow rules
    ("balance aal2_phr", lambda: check_request(BALANCE, token=make_token(acr=ACR_PHR), headers={"x-device-id": "d1"})),
    ("balance aal1 no device", lambda: check_request(BALANCE, token=make_token())),
    ("transfer auditor", lambda: check_request(TRANSFER, token=make_token(roles=["auditor"], acr=ACR_PHR, scope=""))),
    ("transfer teller aal2", lambda: check_request(TRANSFER, token=make_token(acr=ACR_2FA))),
    ("transfer teller phr no device", lambda: check_request(TRANSFER, token=make_token(acr=ACR_PHR))),
    ("healthz", lambda: check_request("/healthz", method="GET", grpc=False, token=make_token(sub="bob"))),
    ("no token", lambda: check_request(BALANCE)),
    ("bad path", lambda: check_request("/a/../b", method="GET", grpc=False)),
]


def test_shadow_rules_never_change_an_answer_or_add_a_header(shadowed: Running, plain: Running) -> None:
    for name, req in REQUESTS:
        request = req()
        assert _answer(shadowed.check(request)) == _answer(plain.check(request)), name


def test_a_shadow_sensitivity_rule_that_would_step_up_is_logged_counted_and_traced(shadowed: Running) -> None:
    resp = shadowed.check(check_request(BALANCE, token=make_token(acr=ACR_2FA), headers={"x-device-id": "d1"}))
    assert resp.status.code == 0  # enforced: balance is `low`; allowed
    line = shadowed.log_lines()[-1]
    assert line["outcome"] == "allow" and line["reason"] == "allowed"
    assert line["shadow"] == [
        {"rule": "balance-critical", "table": "sensitivity", "outcome": "step_up", "reason": "acr_too_low"},
        # the device rule raises `low` (aal1) to aal2, which aal2 meets: no disagreement from it
    ]
    assert _count(shadowed, "balance-critical", "step_up") == 1
    span = shadowed.exporter.get_finished_spans()[-1]
    assert span.attributes["authz.outcome"] == "allow"
    assert list(span.attributes["authz.shadow.rules"]) == ["balance-critical"]
    assert list(span.attributes["authz.shadow.outcomes"]) == ["step_up"]
    assert list(span.attributes["authz.shadow.reasons"]) == ["acr_too_low"]
    assert line["decision_id"] == span.attributes["authz.decision_id"]


def test_a_shadow_permission_that_would_grant_and_a_shadow_risk_rule(shadowed: Running) -> None:
    resp = shadowed.check(check_request(TRANSFER, token=make_token(roles=["auditor"], acr=ACR_PHR, scope="")))
    assert resp.denied_response.status.code == 403
    line = shadowed.log_lines()[-1]
    assert line["reason"] == "permission_denied"
    by_rule = {s["rule"]: s for s in line["shadow"]}
    # auditors would be granted; no device id: that grant would then ask one level more (aal3)
    assert by_rule["auditors-transfer"] == {
        "rule": "auditors-transfer", "table": "permissions", "outcome": "allow", "reason": "allowed",
    }
    assert set(by_rule) == {"auditors-transfer"}
    # A teller with phr and no device: the device rule would raise high (aal2_phr) to aal3.
    shadowed.check(check_request(TRANSFER, token=make_token(acr=ACR_PHR)))
    line = shadowed.log_lines()[-1]
    assert line["outcome"] == "allow"
    assert line["shadow"] == [{"rule": "device", "table": "risk", "outcome": "step_up", "reason": "acr_too_low"}]
    assert _count(shadowed, "device", "step_up") == 1
    assert _count(shadowed, "auditors-transfer", "allow") == 1


def test_agreement_leaves_no_trace_of_the_shadow_rules(shadowed: Running) -> None:
    shadowed.check(check_request(BALANCE, token=make_token(acr="phrh"), headers={"x-device-id": "d1"}))
    line = shadowed.log_lines()[-1]
    assert line["outcome"] == "allow" and "shadow" not in line
    assert "authz.shadow.rules" not in shadowed.exporter.get_finished_spans()[-1].attributes


def test_a_shadow_rule_never_costs_a_signature_check(shadowed: Running) -> None:
    # /healthz is public: the answer verifies no token. The shadow rule making it `low` would
    # need the token verified: it is reported as unknown, and nothing was verified.
    verifier = shadowed.runtime.verifier
    before = verifier.verifications
    resp = shadowed.check(check_request("/healthz", method="GET", grpc=False, token=make_token(sub="carol")))
    assert resp.status.code == 0
    assert verifier.verifications == before
    line = shadowed.log_lines()[-1]
    assert line["reason"] == "public"
    assert line["shadow"] == [
        {"rule": "health-low", "table": "sensitivity", "outcome": "unknown", "reason": "token_not_verified"}
    ]
    # Once the answer to some call has verified that token, the shadow rule can use it.
    shadowed.check(check_request(BALANCE, token=make_token(sub="carol"), headers={"x-device-id": "d"}))
    assert verifier.verifications == before + 1
    shadowed.check(check_request("/healthz", method="GET", grpc=False, token=make_token(sub="carol")))
    assert verifier.verifications == before + 1
    line = shadowed.log_lines()[-1]
    # ... and finds what the rule would really do: no permission names /healthz, so deny.
    assert line["shadow"] == [
        {"rule": "health-low", "table": "sensitivity", "outcome": "deny", "reason": "permission_denied"}
    ]


def test_a_shadow_sensitivity_rule_may_take_an_enforced_rules_pattern_but_two_shadows_may_not() -> None:
    p = policy(SHADOW_CRITICAL)
    assert [s.rule_id for s in p.shadows] == ["balance-critical"]
    assert p.rule_ids["sensitivity"] == ("health", "balance", "accounts", "transfer", "admin")
    twice = (SENS, f'    - {{id: b2, match: ["{BALANCE}"], level: high, mode: shadow}}\n{SENS}')
    with pytest.raises(PolicyError) as e:
        policy(SHADOW_CRITICAL, twice)
    assert "is also claimed by rule 'balance-critical'" in str(e.value)
    assert "sensitivity.rules" in str(e.value) or "sensitivity" in str(e.value)


def test_mode_is_validated() -> None:
    bad = (SENS, f'    - {{id: x, match: ["{BALANCE}"], level: low, mode: dry-run}}\n{SENS}')
    with pytest.raises(PolicyError) as e:
        policy(bad)
    assert "'dry-run' is not one of ['enforce', 'shadow']" in str(e.value)
    ok = (SENS, f'    - {{id: x, match: ["/x.v1.X/*"], level: low, mode: enforce}}\n{SENS}')
    assert not policy(ok).shadows


def test_each_shadow_rule_reports_what_the_policy_with_it_enforced_decides() -> None:
    """Differential: for every shadow rule and request, the reported disagreement (or its
    absence) matches a policy where that rule is simply enforced."""
    import asyncio

    from sidecar.decision import same_answer
    from sidecar.runtime import Runtime
    from sidecar.telemetry import Metrics, Telemetry
    from tests.helpers import FixedClock

    http_shadow = (SENS, '    - {id: accounts-high, match: ["GET /v1/accounts/**"], level: high, mode: shadow}\n' + SENS)
    purge = (SENS, '    - {id: purge, match: ["Purge /v1/accounts/**"], level: low, mode: shadow}\n' + SENS)
    purge_grant = (PERMS, '  - {id: purgers, match: ["* /v1/accounts/**"], allow: {roles: [teller]}, mode: shadow}\n' + PERMS)
    reps = [SHADOW_CRITICAL, SHADOW_GRANT, SHADOW_DEVICE, SHADOW_PUBLIC, http_shadow, purge, purge_grant]
    tel = Telemetry(None, decision_log=None, metrics=Metrics())
    shadowed = Runtime(policy(*reps), tel, FixedClock(NOW))
    requests = [r() for _, r in REQUESTS] + [
        check_request(BALANCE, token=make_token(acr=a, roles=roles), headers=h)
        for a in ("urn:okta:loa:1fa:any", ACR_2FA, ACR_PHR, "phrh")
        for roles in (["teller"], ["auditor"], [])
        for h in ({}, {"x-device-id": "d"})
    ] + [
        check_request(path, method=m, grpc=False, token=make_token(acr=a), headers=h)
        for path in ("/v1/accounts/1", "/v1/accounts/1/", "/v1/accounts/1/balance", "/v1/accounts/1/balance/", "/healthz/")
        for m in ("GET", "HEAD", "get", "Purge", "PURGE", "POST")
        for a in ("urn:okta:loa:1fa:any", ACR_PHR)
        for h in ({}, {"x-device-id": "d"})
    ] + [
        check_request(TRANSFER, token=make_token(acr=a, roles=roles, scope=sc), headers=h)
        for a in (ACR_2FA, ACR_PHR, "phrh")
        for roles in (["teller"], ["auditor"])
        for sc in ("payments", "")
        for h in ({}, {"x-device-id": "d"})
    ]
    seen: collections.Counter[str] = collections.Counter()
    for i, (old, new) in enumerate(reps):
        rule = new.split("id: ", 1)[1].split(",", 1)[0]
        enforced_reps = [*reps[:i], (old, new.replace(", mode: shadow", "")), *reps[i + 1 :]]
        if rule == "balance-critical":  # it takes the pattern of `balance`, as it would enforced
            enforced_reps.append((f'match: ["{BALANCE}", "GET', 'match: ["GET'))
        if rule == "accounts-high":  # it takes that pattern of `accounts`
            enforced_reps.append(('match: ["/bank.v1.Accounts/*", "GET /v1/accounts/**"], level: personal', 'match: ["/bank.v1.Accounts/*"], level: personal'))
        if rule == "health-low":  # it takes the place of `health`
            enforced_reps.append(('{id: health, match: ["GET /healthz"], level: public}', "{id: health, match: [GET /x], level: public}"))
        enforced = Runtime(policy(*enforced_reps), tel, FixedClock(NOW))
        for req in requests:
            ev = asyncio.run(shadowed.evaluate(req))
            want = asyncio.run(enforced.evaluate(req)).decision
            mine = [s for s in ev.shadow if s.rule == rule]
            if mine and mine[0].outcome == "unknown":
                continue
            if same_answer(want, ev.decision):
                assert not mine, (rule, req.attributes.request.http.path)
                seen["agree"] += 1
            else:
                assert mine and mine[0].outcome == want.outcome.value and mine[0].reason == want.reason, rule
                seen[rule] += 1
    assert seen["agree"] > 50, seen
    assert all(seen[r] >= 2 for r in ("balance-critical", "auditors-transfer", "device", "accounts-high", "purge")), seen
