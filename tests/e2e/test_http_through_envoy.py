"""Plain HTTP/1.1 through a real Envoy, with and without Envoy's jwt_authn filter in front.

With jwt_authn the claims reach the sidecar as metadata_context (the Istio pattern); the outcomes
for valid tokens are the same, and an invalid token is rejected by Envoy before the sidecar."""

from __future__ import annotations

from typing import Any

import e2e_stack as st
import pytest
from e2e_helpers import HttpAnswer, http_request, parse_challenge

pytestmark = pytest.mark.e2e

STEP_UP = "insufficient_user_authentication"
H2 = 2 * 3600
TELLER_1FA = {"acr": st.AAL1, "amr": ("pwd",)}
TELLER_PHR = {"acr": st.AAL2_PHR}
SPOOF = {"x-auth-subject": "mallory", "x-auth-assurance": "aal3", "x-auth-decision-id": "forged"}


@pytest.fixture(params=["envoy", "envoy_jwt"])
def front(request: pytest.FixtureRequest) -> st.Envoy:
    """Both Envoy configurations: ext_authz alone, and jwt_authn + ext_authz."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def send(
    front: st.Envoy, method: str, path: str, claims: dict[str, Any] | None, **headers: str
) -> HttpAnswer:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if claims is not None:
        h["authorization"] = f"Bearer {st.mint(**claims)}"
    body = b'{"from":"acc-1","to":"acc-2","amount_cents":5000}' if method == "POST" else None
    if body is not None:
        h["content-type"] = "application/json"
    return http_request(front.address, method, path, h, body)


def upstream_saw(answer: HttpAnswer) -> dict[str, list[str]]:
    assert answer.status == 200, answer.body
    doc = answer.json()
    assert set(doc) == {"method", "path", "headers"}, "not the upstream's echo"
    return doc["headers"]  # type: ignore[no-any-return]


def test_public_health_is_allowed_and_spoofed_identity_is_removed(front: st.Envoy) -> None:
    """GET /healthz needs no token; the client's x-auth-* values never reach the upstream."""
    seen = upstream_saw(send(front, "GET", "/healthz", None, **SPOOF))
    assert "x-auth-subject" not in seen
    assert "x-auth-assurance" not in seen
    (decision_id,) = seen["x-auth-decision-id"]
    assert decision_id != "forged"


def test_balance_is_allowed_with_identity_headers(front: st.Envoy, sidecar: st.Sidecar) -> None:
    """A password-only teller reads a balance; the upstream sees our subject and assurance only."""
    seen = upstream_saw(send(front, "GET", "/v1/accounts/1/balance", TELLER_1FA, **SPOOF))
    assert seen["x-auth-subject"] == ["alice"]
    assert seen["x-auth-assurance"] == ["aal1"]
    (decision_id,) = seen["x-auth-decision-id"]
    logged = sidecar.decision(decision_id)
    assert logged["outcome"] == "allow"
    assert logged["credential"] == ("jwt_authn" if front.proc.name == "envoy-jwt" else "bearer")


@pytest.mark.parametrize(
    ("claims", "reason", "params"),
    [
        (TELLER_1FA, "acr_too_low", {"acr_values": "phr phrh"}),
        ({**TELLER_PHR, "auth_age": H2}, "auth_too_old", {"max_age": "3600"}),
        ({**TELLER_1FA, "auth_age": H2}, "acr_too_low", {"acr_values": "phr phrh", "max_age": "3600"}),
    ],
    ids=["password-only", "stale", "weak-and-stale"],
)
def test_transfer_step_up_is_401_with_challenge_and_json_body(
    front: st.Envoy, sidecar: st.Sidecar, claims: dict[str, Any], reason: str, params: dict[str, str]
) -> None:
    """POST /v1/transfers short of the requirement: 401, RFC 9470 challenge, the same hints as JSON."""
    a = send(front, "POST", "/v1/transfers", claims, **SPOOF)
    assert a.status == 401
    assert a.header("content-type") == "application/json"
    assert a.header("cache-control") == "no-store"
    scheme, got = parse_challenge(a.header("www-authenticate") or "")
    assert scheme == "Bearer"
    assert set(got) == {"realm", "error", "error_description", *params}
    assert (got["realm"], got["error"]) == ("bank", STEP_UP)
    assert {k: got[k] for k in params} == params
    body = a.json()
    assert set(body) == {"error", "error_description", "reason", "decision_id", *params}
    assert body["error"] == STEP_UP
    assert body["error_description"] == got["error_description"]
    assert body["reason"] == reason
    if "acr_values" in params:
        assert body["acr_values"] == params["acr_values"]
    if "max_age" in params:
        assert body["max_age"] == int(params["max_age"])  # a JSON number
    logged = sidecar.decision(body["decision_id"])
    assert (logged["outcome"], logged["reason"]) == ("step_up", reason)


def test_stepped_up_transfer_is_allowed(front: st.Envoy) -> None:
    seen = upstream_saw(send(front, "POST", "/v1/transfers", TELLER_PHR))
    assert seen["x-auth-assurance"] == ["aal2_phr"]


def test_teller_admin_call_is_403_without_hints(front: st.Envoy) -> None:
    """A permission denial: 403, no challenge (step-up cannot fix it), JSON body without acr hints."""
    a = send(front, "POST", "/v1/admin/users/bob", TELLER_PHR)
    assert a.status == 403
    assert a.header("www-authenticate") is None
    body = a.json()
    assert (body["error"], body["reason"]) == ("access_denied", "permission_denied")
    assert "acr_values" not in body and "max_age" not in body


def test_no_token_is_401_with_bare_challenge(front: st.Envoy) -> None:
    a = send(front, "GET", "/v1/accounts/1/balance", None)
    assert a.status == 401
    assert parse_challenge(a.header("www-authenticate") or "") == ("Bearer", {"realm": "bank"})


def test_unknown_route_is_denied_by_default(front: st.Envoy) -> None:
    a = send(front, "GET", "/v1/unknown", TELLER_PHR)
    assert a.status == 403
    assert a.json()["reason"] == "no_matching_rule"


def test_jwt_authn_rejects_a_bad_token_before_the_sidecar(envoy_jwt: st.Envoy, sidecar: st.Sidecar) -> None:
    """With jwt_authn in front, a token with a bad signature never reaches the sidecar."""
    from joserfc.jwk import RSAKey

    other = RSAKey.generate_key(2048, parameters={"kid": "dev-2024"}, private=True)
    before = len(sidecar.decisions())
    checks = envoy_jwt.stat("http.ingress_http.ext_authz.ok") + envoy_jwt.stat(
        "http.ingress_http.ext_authz.denied"
    )
    a = http_request(
        envoy_jwt.address,
        "GET",
        "/v1/accounts/1/balance",
        {"authorization": f"Bearer {st.mint(**TELLER_1FA, key=other)}"},
    )
    assert a.status == 401
    assert a.body == b"Jwt verification fails"
    _, params = parse_challenge(a.header("www-authenticate") or "")
    assert params["error"] == "invalid_token"
    assert (
        envoy_jwt.stat("http.ingress_http.ext_authz.ok")
        + envoy_jwt.stat("http.ingress_http.ext_authz.denied")
        == checks
    )
    assert len(sidecar.decisions()) == before


def _access_log(front: st.Envoy, decision_id: str) -> dict[str, Any]:
    import json
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # Envoy flushes its access log asynchronously
        for line in front.proc.stdout().splitlines():
            if decision_id in line and line.startswith("{"):
                return json.loads(line)  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"no access log line for {decision_id}:\n{front.proc.stdout()[-2000:]}")


def test_envoy_access_log_carries_the_decision_from_dynamic_metadata(front: st.Envoy) -> None:
    """The sidecar's decision id, outcome and reason reach Envoy's own access log, allow or deny."""
    allowed = send(front, "GET", "/v1/accounts/1/balance", TELLER_1FA)
    (decision_id,) = upstream_saw(allowed)["x-auth-decision-id"]
    line = _access_log(front, decision_id)
    assert (line["authz_outcome"], line["authz_reason"], line["status"]) == ("allow", "allowed", 200)

    denied = send(front, "POST", "/v1/transfers", TELLER_1FA)
    assert denied.status == 401
    line = _access_log(front, denied.json()["decision_id"])
    assert (line["authz_outcome"], line["authz_reason"], line["status"]) == ("step_up", "acr_too_low", 401)
