"""Issue 12: one challenge that a client can always satisfy.

- an issuer's acr mapping can say which methods an acr value guarantees (`implies_amr`); a
  required method is met by the token's amr or by such a value;
- a challenge asks for acr values that meet the level and imply every required method, with
  max_age when the login is too old: one re-login satisfies it (the Keycloak-style scenario
  needs exactly one step-up, where it used to need two and then looped);
- a required method that no requestable acr value implies is refused at load, with the place;
- error_description says in plain words what is asked; the JSON body and ErrorInfo carry
  `required_amr`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from google.rpc import error_details_pb2, status_pb2

from sidecar.client import bearer_step_up
from sidecar.compiler import PolicyError, load_policy_text
from sidecar.runtime import Runtime, wire_answer
from sidecar.telemetry import Metrics, Telemetry
from tests.helpers import EXAMPLE_POLICY, NOW, FixedClock, check_request, make_token

KEYS = EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json"
TRANSFER = "/bank.v1.Payments/Transfer"

KEYCLOAK = f"""\
version: 1
name: keycloak
realm: kc
assurance:
  levels: [bronze, silver, gold]
  amr_derivation: false
  describe: {{gold: a phishing-resistant login}}
issuers:
  - id: kc
    issuer: https://idp.example.test
    audiences: [bank-api]
    jwks_file: {KEYS}
    acr:
      silver: {{accept: [silver]}}
      gold: {{accept: [gold], implies_amr: {{gold: [hwk]}}}}
sensitivity:
  levels:
    low: {{min_assurance: silver}}
    critical: {{min_assurance: gold, max_age: 5m, required_amr: [hwk]}}
  rules:
    - {{id: read, match: ["/bank.v1.Accounts/*"], level: low}}
    - {{id: move, match: ["{TRANSFER}"], level: critical}}
permissions:
  - {{id: all, match: ["/bank.v1.Accounts/*", "{TRANSFER}"], allow: {{roles: [teller]}}}}
"""


def runtime(text: str) -> Runtime:
    policy = load_policy_text(text, file="p.yaml")
    return Runtime(policy, Telemetry(None, decision_log=None, metrics=Metrics()), FixedClock(NOW))


def answer(rt: Runtime, token: str, *, grpc: bool = True) -> tuple[str, str, dict[str, str], Any]:
    """(outcome, reason, response headers, the decision) of one Check."""
    ev = asyncio.run(rt.evaluate(check_request(TRANSFER, token=token, grpc=grpc)))
    resp = wire_answer(ev, "0123456789abcdef")
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    body = resp.denied_response.body
    return ev.decision.outcome.value, ev.decision.reason, headers, (ev.decision, body)


def test_the_keycloak_scenario_needs_exactly_one_step_up() -> None:
    rt = runtime(KEYCLOAK)
    token = make_token(acr="silver", amr=["pwd"])
    challenges = []
    for _ in range(3):  # a client that follows every challenge, as sidecar.client does
        outcome, reason, headers, (decision, _) = answer(rt, token)
        if outcome == "allow":
            break
        assert outcome == "step_up", reason
        challenge = bearer_step_up(headers["www-authenticate"])
        assert challenge is not None
        challenges.append((reason, challenge, decision))
        # The IdP logs the user in at the first acr value asked for; its gold flow uses a
        # security key and a one-time code, and says only `otp` in amr.
        token = make_token(acr=challenge.acr_values[0], amr=["otp"], auth_time=int(NOW))
    assert outcome == "allow"
    assert len(challenges) == 1
    reason, challenge, decision = challenges[0]
    assert reason == "acr_too_low"
    assert challenge.acr_values == ("gold",) and challenge.max_age is None
    assert decision.required_amr == ("hwk",)  # in the ErrorInfo and the JSON body
    assert challenge.error_description == (
        "a stronger authentication is required: a phishing-resistant login with a security key"
    )


def test_a_challenge_asks_for_level_methods_and_freshness_at_once() -> None:
    rt = runtime(KEYCLOAK)
    stale = make_token(acr="silver", amr=["pwd"], auth_time=int(NOW) - 3600)
    outcome, reason, headers, (decision, body) = answer(rt, stale, grpc=False)
    assert (outcome, reason) == ("step_up", "acr_too_low")
    assert headers["www-authenticate"] == (
        'Bearer realm="kc", error="insufficient_user_authentication", error_description="a stronger'
        ' authentication is required: a phishing-resistant login with a security key within the last'
        ' 5 minutes", acr_values="gold", max_age=300'
    )
    doc = json.loads(body)
    assert doc["required_amr"] == "hwk" and doc["acr_values"] == "gold" and doc["max_age"] == 300
    _, _, grpc_headers, _ = answer(rt, stale)
    status = status_pb2.Status.FromString(base64.b64decode(grpc_headers["grpc-status-details-bin"] + "=="))
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.metadata["required_amr"] == "hwk" and info.metadata["acr_values"] == "gold"
    # A gold login that is too old: freshness only, but still the acr value a re-login must keep.
    old_gold = make_token(acr="gold", amr=["otp"], auth_time=int(NOW) - 3600)
    outcome, reason, headers, (decision, _) = answer(rt, old_gold)
    assert (outcome, reason) == ("step_up", "auth_too_old")
    assert decision.max_age == 300 and decision.acr_values == ()
    assert decision.description == "a more recent authentication is required: a login within the last 5 minutes"


AMR_LEVELS = f"""\
version: 1
realm: t
assurance:
  levels: [aal1, aal2, aal3]
issuers:
  - id: dev
    issuer: https://idp.example.test
    audiences: [bank-api]
    jwks_file: {KEYS}
    acr:
      aal1: {{accept: [one]}}
      aal2: {{accept: [two, two-key], implies_amr: {{two-key: [hwk]}}}}
      aal3: {{accept: [three]}}
sensitivity:
  levels:
    vault: {{min_assurance: aal2, required_amr: [hwk]}}
  rules:
    - {{id: v, match: ["{TRANSFER}"], level: vault}}
permissions:
  - {{id: p, match: ["{TRANSFER}"], allow: {{roles: [teller]}}}}
"""


def test_a_missing_method_asks_only_for_values_that_imply_it_never_the_one_held() -> None:
    rt = runtime(AMR_LEVELS)
    outcome, reason, _, (decision, _) = answer(rt, make_token(acr="two", amr=["otp"]))
    assert (outcome, reason) == ("step_up", "amr_missing")
    assert decision.acr_values == ("two-key",)  # not "two" (held already), not "three" (no hwk)
    assert decision.description == "another authentication method is required: a login at level aal2 with a security key"
    assert answer(rt, make_token(acr="two-key", amr=["otp"]))[0] == "allow"  # implied
    assert answer(rt, make_token(acr="two", amr=["hwk"]))[0] == "allow"  # in the token's amr
    assert answer(rt, make_token(acr="three", amr=["pwd"]))[1] == "amr_missing"  # aal3 does not imply it


def _problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, file="p.yaml")
    return [str(p) for p in e.value.problems]


def test_a_method_no_requestable_acr_value_implies_is_refused_at_load() -> None:
    found = _problems(KEYCLOAK.replace(", implies_amr: {gold: [hwk]}", ""))
    assert any(
        p.startswith("p.yaml:19:")
        and "sensitivity.levels.critical.required_amr: requires hwk at 'gold' or above, but no acr value"
        " issuer 'kc' can be asked for (gold) implies it" in p
        and "add e.g. `implies_amr: {gold: [hwk]}`" in p
        for p in found
    ), found


def test_a_risk_raised_level_must_still_be_askable_with_its_methods() -> None:
    text = AMR_LEVELS.replace(
        "aal1: {accept: [one]}", "aal1: {accept: [one], implies_amr: {one: [hwk]}}"
    ).replace(
        "      aal2: {accept: [two, two-key], implies_amr: {two-key: [hwk]}}", "      aal2: {accept: [two]}"
    ).replace("vault: {min_assurance: aal2,", "vault: {min_assurance: aal1,")
    load_policy_text(text, file="p.yaml")  # aal1's `one` implies hwk: askable
    raised = text.replace("permissions:", "risk:\n  - {id: r, when: {source_not_in: [10.0.0.0/8]}, raise: 1}\npermissions:")
    found = _problems(raised)
    assert any("requires hwk at 'aal2' or above" in p for p in found), found


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("implies_amr: {two-key: [hwk]}", "implies_amr: {three: [hwk]}",
         "issuers[0].acr.aal2.implies_amr.three: acr 'three' is not one this level accepts (two, two-key)"),
        ("implies_amr: {two-key: [hwk]}", "implies_amr: {two-key: []}", "implies_amr.two-key: [] should be non-empty"),
        ("  levels: [aal1, aal2, aal3]\n", "  levels: [aal1, aal2, aal3]\n  describe: {aal9: x}\n",
         "assurance.describe.aal9: unknown assurance level 'aal9'"),
        ("  levels: [aal1, aal2, aal3]\n", "  levels: [aal1, aal2, aal3]\n  describe: {aal2: déjà vu}\n",
         "assurance.describe.aal2: 'déjà vu' does not have the expected form"),
    ],
)
def test_bad_implies_amr_and_describe_are_refused_with_the_place(old: str, new: str, expected: str) -> None:
    assert old in AMR_LEVELS
    found = _problems(AMR_LEVELS.replace(old, new))
    assert any(expected in p for p in found), found
