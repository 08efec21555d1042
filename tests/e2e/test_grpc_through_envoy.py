"""gRPC through a real Envoy: a Python gRPC client -> Envoy (ext_authz) -> sidecar, then the bank
upstream. What a client sees (status, challenge trailers, ErrorInfo) and what the upstream sees."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import e2e_stack as st
import grpc
import pytest
from e2e_helpers import metadata_values, parse_challenge
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar._proto.bank.v1 import bank_pb2, bank_pb2_grpc

pytestmark = pytest.mark.e2e

OK, UNAUTHENTICATED, PERMISSION_DENIED = (
    grpc.StatusCode.OK,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)
STEP_UP = "insufficient_user_authentication"


@pytest.fixture(scope="module", params=["envoy", "envoy_jwt"])
def front(request: pytest.FixtureRequest) -> st.Envoy:
    """Both Envoy configurations: ext_authz alone, and jwt_authn (claims as metadata) + ext_authz."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def channel(front: st.Envoy) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(front.address) as ch:
        yield ch


def rpc(channel: grpc.Channel, op: str, token: str | None, extra: tuple[tuple[str, str], ...] = ()) -> Any:
    """Call one bank operation; -> (code, response or None, call or RpcError)."""
    md = ((("authorization", f"Bearer {token}"),) if token else ()) + extra
    stubs = {
        "balance": (
            bank_pb2_grpc.AccountsStub(channel).GetBalance,
            bank_pb2.GetBalanceRequest(account_id="acc-1"),
        ),
        "transfer": (
            bank_pb2_grpc.PaymentsStub(channel).Transfer,
            bank_pb2.TransferRequest(from_account="acc-1", to_account="acc-2", amount_cents=5000),
        ),
        "admin": (
            bank_pb2_grpc.AdminStub(channel).SetPermissions,
            bank_pb2.SetPermissionsRequest(user_id="bob", roles=["teller"]),
        ),
    }
    method, request = stubs[op]
    try:
        resp, call = method.with_call(request, metadata=md, timeout=5)
        return OK, resp, call
    except grpc.RpcError as e:
        return e.code(), None, e


TELLER_1FA = {"acr": st.AAL1, "amr": ("pwd",)}
TELLER_PHR = {"acr": st.AAL2_PHR}
ADMIN_PHRH = {"roles": ("admin",), "acr": st.AAL3}
H2 = 2 * 3600

# (id, operation, token claims or None for no token, code, WWW-Authenticate params or None,
#  ErrorInfo reason, ErrorInfo metadata that must be present / absent)
CASES = [
    ("teller-reads-balance-password-only", "balance", TELLER_1FA, OK, None, None, {}),
    ("no-token", "balance", None, UNAUTHENTICATED, {"realm": "bank"}, None, {}),
    (
        "password-only-transfer-steps-up-strength",
        "transfer",
        TELLER_1FA,
        UNAUTHENTICATED,
        {"realm": "bank", "error": STEP_UP, "error_description": ..., "acr_values": "phr phrh"},
        "INSUFFICIENT_USER_AUTHENTICATION",
        {"acr_values": "phr phrh", "max_age": None},
    ),
    ("stepped-up-transfer-allowed", "transfer", TELLER_PHR, OK, None, None, {}),
    (
        "stale-step-up-gets-freshness-challenge",
        "transfer",
        {**TELLER_PHR, "auth_age": H2},
        UNAUTHENTICATED,
        {"realm": "bank", "error": STEP_UP, "error_description": ..., "max_age": "3600"},
        "INSUFFICIENT_USER_AUTHENTICATION",
        {"max_age": "3600", "acr_values": None},
    ),
    (
        "weak-and-stale-asks-for-both",
        "transfer",
        {**TELLER_1FA, "auth_age": H2},
        UNAUTHENTICATED,
        {
            "realm": "bank",
            "error": STEP_UP,
            "error_description": ...,
            "acr_values": "phr phrh",
            "max_age": "3600",
        },
        "INSUFFICIENT_USER_AUTHENTICATION",
        {"acr_values": "phr phrh", "max_age": "3600"},
    ),
    (
        "teller-admin-call-is-permission-denied-without-hints",
        "admin",
        TELLER_PHR,
        PERMISSION_DENIED,
        None,
        "PERMISSION_DENIED",
        {"acr_values": None, "max_age": None},
    ),
    (
        "missing-scope-is-insufficient-scope",
        "transfer",
        {**TELLER_PHR, "scope": ""},
        PERMISSION_DENIED,
        {"realm": "bank", "error": "insufficient_scope", "scope": "payments"},
        "INSUFFICIENT_SCOPE",
        {"scope": "payments", "acr_values": None},
    ),
    ("admin-with-phrh-allowed", "admin", ADMIN_PHRH, OK, None, None, {}),
    (
        "admin-with-phr-asks-for-phrh",
        "admin",
        {"roles": ("admin",), "acr": st.AAL2_PHR},
        UNAUTHENTICATED,
        {"realm": "bank", "error": STEP_UP, "error_description": ..., "acr_values": "phrh"},
        "INSUFFICIENT_USER_AUTHENTICATION",
        {"acr_values": "phrh", "max_age": None},
    ),
    (
        "admin-after-20-minutes-max-age-900",
        "admin",
        {**ADMIN_PHRH, "auth_age": 1200},
        UNAUTHENTICATED,
        {"realm": "bank", "error": STEP_UP, "error_description": ..., "max_age": "900"},
        "INSUFFICIENT_USER_AUTHENTICATION",
        {"max_age": "900", "acr_values": None},
    ),
]


@pytest.mark.parametrize(
    ("op", "claims", "code", "challenge", "reason", "info_md"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_grpc_outcome_status_challenge_and_error_info(
    channel: grpc.Channel,
    op: str,
    claims: dict[str, Any] | None,
    code: grpc.StatusCode,
    challenge: dict[str, Any] | None,
    reason: str | None,
    info_md: dict[str, str | None],
) -> None:
    """Each case: the exact gRPC status, the exact WWW-Authenticate parameters in the trailing
    metadata (none on a plain denial), and a google.rpc.Status whose ErrorInfo carries the hints."""
    token = st.mint(**claims) if claims is not None else None
    got, _, call = rpc(channel, op, token)
    assert got == code, call.details() if got != OK else ""
    if code == OK:
        return
    trailers = call.trailing_metadata()
    www = metadata_values(trailers, "www-authenticate")
    if challenge is None:
        assert www == []
    else:
        assert len(www) == 1
        scheme, params = parse_challenge(www[0])
        assert scheme == "Bearer"
        assert set(params) == set(challenge)
        for k, v in challenge.items():
            if v is not ...:
                assert params[k] == v, k
            else:
                assert params[k]
    if reason is None:
        return
    status = rpc_status.from_call(call)
    assert status is not None, "grpc-status-details-bin missing or inconsistent with the status message"
    assert status.code == code.value[0]
    assert status.message == call.details()
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert info.reason == reason
    assert info.domain == "stepup-sidecar"
    for k, v in info_md.items():
        if v is None:
            assert k not in info.metadata, k
        else:
            assert info.metadata[k] == v, k


def test_step_up_message_is_plain_and_names_the_error(channel: grpc.Channel) -> None:
    """The gRPC status message a human sees starts with the RFC 9470 error code."""
    code, _, call = rpc(channel, "transfer", st.mint(**TELLER_1FA))
    assert code == UNAUTHENTICATED
    assert call.details().startswith(f"{STEP_UP}: ")


def test_bad_signature_is_invalid_token(channel: grpc.Channel) -> None:
    """A token signed by a key the issuer does not publish is UNAUTHENTICATED with invalid_token."""
    from joserfc.jwk import RSAKey

    other = RSAKey.generate_key(2048, parameters={"kid": "dev-2024"}, private=True)
    code, _, call = rpc(channel, "balance", st.mint(**TELLER_1FA, key=other))
    assert code == UNAUTHENTICATED
    (www,) = metadata_values(call.trailing_metadata(), "www-authenticate")
    _, params = parse_challenge(www)
    assert params["error"] == "invalid_token"
    assert "acr_values" not in params


def test_upstream_sees_our_identity_headers_never_the_clients(
    channel: grpc.Channel, sidecar: st.Sidecar, front: st.Envoy
) -> None:
    """Client-sent x-auth-* headers are overwritten: the upstream sees exactly one value of each,
    ours, and the decision id it sees is the one the sidecar logged for this call."""
    spoofed = (
        ("x-auth-subject", "mallory"),
        ("x-auth-assurance", "aal3"),
        ("x-auth-decision-id", "forged"),
        ("x-auth-issuer", "https://evil.example"),
    )
    code, resp, call = rpc(channel, "transfer", st.mint("alice", **TELLER_PHR), spoofed)
    assert code == OK
    assert (resp.seen_subject, resp.seen_assurance) == ("alice", "aal2_phr")
    md = call.initial_metadata()
    assert metadata_values(md, "x-echo-x-auth-subject") == ["alice"]
    assert metadata_values(md, "x-echo-x-auth-assurance") == ["aal2_phr"]
    assert metadata_values(md, "x-echo-x-auth-issuer") == [st.ISSUER]
    (decision_id,) = metadata_values(md, "x-echo-x-auth-decision-id")
    assert decision_id != "forged"
    logged = sidecar.decision(decision_id)
    assert (logged["outcome"], logged["reason"], logged["subject"]) == ("allow", "allowed", "alice")
    assert logged["credential"] == ("jwt_authn" if front.proc.name == "envoy-jwt" else "bearer")
    assert set(logged["rules"]) == {"tellers-transfer", "transfer"}


def test_denied_call_never_reaches_the_upstream(channel: grpc.Channel) -> None:
    """A step-up answer comes from Envoy/the sidecar: no upstream initial metadata is echoed."""
    code, _, call = rpc(channel, "transfer", st.mint(**TELLER_1FA), (("x-auth-subject", "mallory"),))
    assert code == UNAUTHENTICATED
    assert not [k for k, _ in (call.initial_metadata() or ()) if k.startswith("x-echo-")]
    assert not [k for k, _ in (call.trailing_metadata() or ()) if k.startswith("x-echo-")]
