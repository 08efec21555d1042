"""sidecar.client through a real Envoy and the real sidecar: the interceptors and the httpx Auth get
the challenge Envoy delivered, call back with its acr_values / max_age, and retry exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import e2e_stack as st
import grpc
import grpc.aio
import httpx
import pytest

from sidecar._proto.bank.v1 import bank_pb2, bank_pb2_grpc
from sidecar.client import AioStepUpInterceptor, Challenge, StepUpInterceptor, StepUpRequired
from sidecar.client.httpx_auth import StepUpAuth

pytestmark = pytest.mark.e2e

STEP_UP = "insufficient_user_authentication"
TRANSFER = bank_pb2.TransferRequest(from_account="acc-1", to_account="acc-2", amount_cents=5000)
TELLER_1FA = {"acr": st.AAL1, "amr": ("pwd",)}
TELLER_PHR = {"acr": st.AAL2_PHR, "amr": ("hwk", "pin")}
H2 = 2 * 3600


@pytest.fixture(scope="module", params=["envoy", "envoy_jwt"])
def front(request: pytest.FixtureRequest) -> st.Envoy:
    """Both Envoy configurations: ext_authz alone, and jwt_authn + ext_authz."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def channel(front: st.Envoy) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(front.address) as ch:
        yield ch


class Callback:
    """A reauthenticate callback: records each challenge, returns a token minted with `claims`."""

    def __init__(self, **claims: Any) -> None:
        self.claims = claims
        self.challenges: list[Challenge] = []

    def __call__(self, challenge: Challenge) -> str:
        self.challenges.append(challenge)
        return st.mint(**self.claims)


class Wire(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Inside the step-up interceptor: records the authorization of every attempt sent."""

    def __init__(self) -> None:
        self.attempts: list[str | None] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.attempts.append(dict(details.metadata or ()).get("authorization"))
        return continuation(details, request)


def stubs(channel: grpc.Channel, stepup: StepUpInterceptor) -> tuple[Any, Any, Wire]:
    wire = Wire()
    ch = grpc.intercept_channel(channel, stepup, wire)  # the first interceptor is the outermost
    return bank_pb2_grpc.PaymentsStub(ch), bank_pb2_grpc.AdminStub(ch), wire


# -- gRPC ------------------------------------------------------------------------------------------


def test_step_up_calls_back_with_envoys_challenge_and_the_retry_succeeds(channel: grpc.Channel) -> None:
    """A password-only teller's transfer: one callback with acr_values "phr phrh", one retry with
    the phishing-resistant token, and the bank sees that token's assurance."""
    cb = Callback(**TELLER_PHR)
    weak = st.mint(**TELLER_1FA)
    stepup = StepUpInterceptor(cb, token=weak)
    payments, _, wire = stubs(channel, stepup)
    receipt = payments.Transfer(TRANSFER, timeout=5)
    assert receipt.seen_assurance == "aal2_phr"
    (c,) = cb.challenges
    assert (c.scheme, c.realm, c.error) == ("Bearer", "bank", STEP_UP)
    assert (c.acr_values, c.max_age) == (("phr", "phrh"), None)
    assert c.error_description
    assert len(wire.attempts) == 2
    assert wire.attempts[0] == f"Bearer {weak}"
    assert wire.attempts[1] == f"Bearer {stepup.token}" != wire.attempts[0]


def test_stale_step_up_gets_max_age_and_a_fresh_login_succeeds(channel: grpc.Channel) -> None:
    cb = Callback(**TELLER_PHR)
    payments, _, wire = stubs(channel, StepUpInterceptor(cb, token=st.mint(**TELLER_PHR, auth_age=H2)))
    assert payments.Transfer(TRANSFER, timeout=5).seen_assurance == "aal2_phr"
    (c,) = cb.challenges
    assert (c.acr_values, c.max_age) == ((), 3600)
    assert len(wire.attempts) == 2


def test_a_still_too_weak_token_raises_step_up_required_after_exactly_one_retry(
    channel: grpc.Channel, sidecar: st.Sidecar
) -> None:
    cb = Callback(**TELLER_1FA)
    payments, _, wire = stubs(channel, StepUpInterceptor(cb, token=st.mint(**TELLER_1FA)))
    with pytest.raises(StepUpRequired) as e:
        payments.Transfer(TRANSFER, timeout=5)
    assert len(cb.challenges) == 1
    assert len(wire.attempts) == 2
    err = e.value
    assert err.retried
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.challenge.acr_values == ("phr", "phrh")
    assert err.error_info["reason"] == "acr_too_low"
    logged = sidecar.decision(err.error_info["decision_id"])  # the retry's decision
    assert (logged["outcome"], logged["reason"]) == ("step_up", "acr_too_low")


def test_without_a_callback_step_up_required_comes_after_one_attempt(channel: grpc.Channel) -> None:
    payments, _, wire = stubs(channel, StepUpInterceptor(token=st.mint(**TELLER_1FA)))
    with pytest.raises(StepUpRequired) as e:
        payments.Transfer(TRANSFER, timeout=5)
    assert not e.value.retried and len(wire.attempts) == 1
    assert e.value.challenge.acr_values == ("phr", "phrh")


def test_permission_denied_passes_through_unchanged(channel: grpc.Channel) -> None:
    """A teller on the admin service: PERMISSION_DENIED, no callback, no retry."""
    cb = Callback(roles=("admin",), acr=st.AAL3)
    _, admin, wire = stubs(channel, StepUpInterceptor(cb, token=st.mint(**TELLER_PHR)))
    with pytest.raises(grpc.RpcError) as e:
        admin.SetPermissions(bank_pb2.SetPermissionsRequest(user_id="bob", roles=["admin"]), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not isinstance(e.value, StepUpRequired)
    assert cb.challenges == [] and len(wire.attempts) == 1


def test_an_invalid_token_passes_through_unchanged(channel: grpc.Channel) -> None:
    """An expired token: UNAUTHENTICATED with error="invalid_token" (from the sidecar, or from
    jwt_authn in front of it) is not a step-up."""
    cb = Callback(**TELLER_PHR)
    payments, _, wire = stubs(channel, StepUpInterceptor(cb, token=st.mint(**TELLER_PHR, ttl=-120)))
    with pytest.raises(grpc.RpcError) as e:
        payments.Transfer(TRANSFER, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not isinstance(e.value, StepUpRequired)
    assert cb.challenges == [] and len(wire.attempts) == 1


def test_aio_interceptor_steps_up_through_envoy(front: st.Envoy) -> None:
    seen: list[Challenge] = []

    async def log_in_again(challenge: Challenge) -> str:
        seen.append(challenge)
        return st.mint(**TELLER_PHR)

    async def go() -> Any:
        stepup = AioStepUpInterceptor(log_in_again, token=st.mint(**TELLER_1FA))
        async with grpc.aio.insecure_channel(front.address, interceptors=[stepup]) as ch:
            return await bank_pb2_grpc.PaymentsStub(ch).Transfer(TRANSFER, timeout=5)

    assert asyncio.run(go()).seen_assurance == "aal2_phr"
    assert [(c.acr_values, c.max_age) for c in seen] == [(("phr", "phrh"), None)]


# -- HTTP (Envoy's one listener serves HTTP/1.1 too) ------------------------------------------------

BODY = {"from": "acc-1", "to": "acc-2", "amount_cents": 5000}


def test_httpx_steps_up_through_envoy(front: st.Envoy) -> None:
    cb = Callback(**TELLER_PHR)
    auth = StepUpAuth(cb, token=st.mint(**TELLER_1FA, auth_age=H2))
    with httpx.Client(base_url=f"http://{front.address}", auth=auth, timeout=5) as http:
        r = http.post("/v1/transfers", json=BODY)
    assert r.status_code == 200
    assert r.json()["headers"]["x-auth-assurance"] == ["aal2_phr"]
    (c,) = cb.challenges
    assert (c.acr_values, c.max_age) == (("phr", "phrh"), 3600)


def test_httpx_still_too_weak_raises_after_one_retry_and_403_is_returned(front: st.Envoy) -> None:
    cb = Callback(**TELLER_1FA)
    with httpx.Client(
        base_url=f"http://{front.address}", auth=StepUpAuth(cb, token=st.mint(**TELLER_1FA)), timeout=5
    ) as http:
        with pytest.raises(StepUpRequired) as e:
            http.post("/v1/transfers", json=BODY)
        assert e.value.retried and len(cb.challenges) == 1
        assert e.value.response.json()["reason"] == "acr_too_low"
        denied = http.post("/v1/admin/users/bob", json={})
    assert denied.status_code == 403
    assert len(cb.challenges) == 1
