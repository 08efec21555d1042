"""Decision table: request -> outcome, HTTP status, reason and exact challenge (example policy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from sidecar import response
from sidecar.attributes import from_check_request
from sidecar.engine import Engine
from tests.helpers import ACR_1FA, ACR_2FA, ACR_PHR, ACR_PHRH, NOW, check_request, make_token

TRANSFER = "/bank.v1.Payments/Transfer"
BALANCE = "/bank.v1.Accounts/GetBalance"
ADMIN = "/bank.v1.Admin/SetPermissions"
LEDGER = "spiffe://cluster.local/ns/bank/sa/ledger"


@dataclass
class Case:
    name: str
    request: Any
    outcome: str
    status: int
    reason: str
    www: object = ...  # exact WWW-Authenticate value; None = no header; ... = not checked here
    rules: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tok(**kw: Any) -> str:
    return make_token(**kw)


STEP_UP = 'Bearer realm="bank", error="insufficient_user_authentication"'
CASES = [
    Case(
        "teller reads a balance with a password login",
        check_request(BALANCE, token=tok()),
        "allow",
        200,
        "allowed",
        rules=("balance", "tellers-read"),
    ),
    Case(
        "no credential",
        check_request(BALANCE),
        "unauthenticated",
        401,
        "missing_credential",
        www='Bearer realm="bank"',
    ),
    Case(
        "non-bearer scheme counts as no credential",
        check_request(BALANCE, headers={"authorization": "Basic YWxpY2U6cHc="}),
        "unauthenticated",
        401,
        "missing_credential",
        www='Bearer realm="bank"',
    ),
    Case(
        "lower-case bearer scheme is accepted",
        check_request(BALANCE, headers={"authorization": "bearer " + tok()}),
        "allow",
        200,
        "allowed",
    ),
    Case(
        "expired token",
        check_request(BALANCE, token=tok(exp=NOW - 3600)),
        "unauthenticated",
        401,
        "token_expired",
        www='Bearer realm="bank", error="invalid_token", error_description="the token has expired"',
    ),
    Case(
        "password login asks to step up for a transfer",
        check_request(TRANSFER, token=tok()),
        "step_up",
        401,
        "acr_too_low",
        www=STEP_UP + ', error_description="a stronger authentication is required: a phishing-resistant login", '
        'acr_values="phr phrh"',
        rules=("transfer", "tellers-transfer"),
    ),
    Case(
        "phishing-resistant login, fresh: transfer allowed",
        check_request(TRANSFER, token=tok(acr=ACR_PHR)),
        "allow",
        200,
        "allowed",
    ),
    Case(
        "hardware-bound login also satisfies a transfer",
        check_request(TRANSFER, token=tok(acr=ACR_PHRH)),
        "allow",
        200,
        "allowed",
    ),
    Case(
        "strong but 2 h old login: freshness challenge only",
        check_request(TRANSFER, token=tok(acr=ACR_PHR, auth_time=NOW - 7200)),
        "step_up",
        401,
        "auth_too_old",
        www=STEP_UP + ', error_description="a more recent authentication is required: a login within the last hour", max_age=3600',
    ),
    Case(
        "weak and old: both hints",
        check_request(TRANSFER, token=tok(auth_time=NOW - 7200)),
        "step_up",
        401,
        "acr_too_low",
        www=STEP_UP
        + ', error_description="a stronger authentication is required: a phishing-resistant login within the last '
        'hour", acr_values="phr phrh", max_age=3600',
    ),
    Case(
        "freshly authenticated but still too weak is challenged",
        check_request(TRANSFER, token=tok(acr=ACR_2FA, auth_time=NOW)),
        "step_up",
        401,
        "acr_too_low",
    ),
    Case(
        "no auth_time where max_age is required: freshness challenge",
        check_request(TRANSFER, token=tok(acr=ACR_PHR, drop=("auth_time",))),
        "step_up",
        401,
        "auth_too_old",
    ),
    Case(
        "transfer without the payments scope",
        check_request(TRANSFER, token=tok(scope="accounts")),
        "deny",
        403,
        "insufficient_scope",
        www='Bearer realm="bank", error="insufficient_scope", scope="payments"',
    ),
    Case(
        "teller calling admin: plain 403, no hints",
        check_request(ADMIN, token=tok(acr=ACR_PHRH)),
        "deny",
        403,
        "permission_denied",
        www=None,
    ),
    Case(
        "admin with top-level fresh login",
        check_request(ADMIN, token=tok(roles=["admin"], acr=ACR_PHRH)),
        "allow",
        200,
        "allowed",
    ),
    Case(
        "admin with phr must step up to phrh",
        check_request(ADMIN, token=tok(roles=["admin"], acr=ACR_PHR)),
        "step_up",
        401,
        "acr_too_low",
        www=STEP_UP + ', error_description="a stronger authentication is required: a phishing-resistant login with a hardware-bound key", acr_values="phrh"',
    ),
    Case(
        "admin 20 min after login: max_age=900",
        check_request(ADMIN, token=tok(roles=["admin"], acr=ACR_PHRH, auth_time=NOW - 1200)),
        "step_up",
        401,
        "auth_too_old",
        www=STEP_UP + ', error_description="a more recent authentication is required: a login within the last 15 minutes", max_age=900',
    ),
    Case(
        "operation in no table: default deny",
        check_request("/bank.v1.Vault/Open", token=tok()),
        "deny",
        403,
        "no_matching_rule",
    ),
    Case(
        "public health check needs nothing",
        check_request("/healthz", method="GET", grpc=False),
        "allow",
        200,
        "public",
    ),
    Case(
        "POST to the public GET route is not covered",
        check_request("/healthz", method="POST", grpc=False),
        "deny",
        403,
        "no_matching_rule",
    ),
    Case(
        "untrusted network raises balance to aal2",
        check_request("/v1/accounts/7/balance", method="GET", grpc=False, token=tok(), source="203.0.113.9"),
        "step_up",
        401,
        "acr_too_low",
        www=STEP_UP + ', error_description="a stronger authentication is required: a two-factor login", '
        'acr_values="urn:okta:loa:2fa:any phr phrh"',
        rules=("balance", "tellers-read", "untrusted-network"),
    ),
    Case(
        "untrusted network caps max_age at 30 min",
        check_request(
            "/v1/accounts/7/balance",
            method="GET",
            grpc=False,
            source="203.0.113.9",
            token=tok(acr=ACR_2FA, auth_time=NOW - 2400),
        ),
        "step_up",
        401,
        "auth_too_old",
        www=STEP_UP + ', error_description="a more recent authentication is required: a login within the last 30 minutes", max_age=1800',
    ),
    Case(
        "unknown source address counts as untrusted",
        check_request("/v1/accounts/7/balance", method="GET", grpc=False, token=tok(), source=""),
        "step_up",
        401,
        "acr_too_low",
    ),
    Case(
        "IPv4-mapped IPv6 loopback is trusted",
        check_request(BALANCE, token=tok(), source="::ffff:127.0.0.1"),
        "allow",
        200,
        "allowed",
    ),
    Case(
        "ledger workload reads a balance over mTLS",
        check_request(BALANCE, principal=LEDGER),
        "allow",
        200,
        "workload_granted",
        rules=("balance", "ledger-service"),
    ),
    Case(
        "other workload without a token",
        check_request(BALANCE, principal=LEDGER + "x"),
        "unauthenticated",
        401,
        "missing_credential",
    ),
    Case(
        "ledger principal cannot transfer",
        check_request(TRANSFER, principal=LEDGER),
        "unauthenticated",
        401,
        "missing_credential",
    ),
    Case(
        "a user token through the ledger is judged as the user",
        check_request(TRANSFER, principal=LEDGER, token=tok()),
        "step_up",
        401,
        "acr_too_low",
    ),
    Case(
        "amr pwd+otp derives aal2 for personal data",
        check_request(
            "/v1/accounts/7", method="GET", grpc=False, token=tok(drop=("acr",), amr=["pwd", "otp"])
        ),
        "allow",
        200,
        "allowed",
    ),
    Case(
        "amr pwd alone derives aal1: personal data needs aal2",
        check_request("/v1/accounts/7", method="GET", grpc=False, token=tok(drop=("acr",), amr=["pwd"])),
        "step_up",
        401,
        "acr_too_low",
    ),
    Case(
        "amr never derives the top level",
        check_request(ADMIN, token=tok(roles=["admin"], drop=("acr",), amr=["mfa", "hwk", "pwd", "face"])),
        "step_up",
        401,
        "acr_too_low",
    ),
    Case(
        "unknown acr without amr: no level",
        check_request(BALANCE, token=tok(acr="gold", amr=[])),
        "step_up",
        401,
        "acr_too_low",
    ),
    Case(
        "two credentials comma-joined are ambiguous",
        check_request(BALANCE, headers={"authorization": f"Bearer {tok()},Bearer {tok(sub='bob')}"}),
        "deny",
        400,
        "ambiguous_credentials",
        www='Bearer realm="bank", error="invalid_request", '
        'error_description="more than one credential was presented"',
    ),
    Case(
        "route raises balance to critical via context_extensions",
        check_request(BALANCE, token=tok(), context_extensions={"sensitivity": "critical"}),
        "step_up",
        401,
        "acr_too_low",
        rules=("balance", "context_extension:critical", "tellers-read"),
    ),
    Case(
        "route cannot lower a level via context_extensions",
        check_request(TRANSFER, token=tok(), context_extensions={"sensitivity": "public"}),
        "step_up",
        401,
        "acr_too_low",
    ),
    Case(
        "route names an unknown level: deny",
        check_request(BALANCE, token=tok(), context_extensions={"sensitivity": "bogus"}),
        "deny",
        403,
        "unknown_sensitivity",
    ),
    Case(
        "claims verified by Envoy's jwt_authn",
        check_request(
            TRANSFER,
            jwt_payload={
                "iss": "https://idp.example.test",
                "aud": "bank-api",
                "sub": "carol",
                "roles": ["teller"],
                "scope": "payments",
                "acr": "phr",
                "exp": NOW + 60,
                "auth_time": NOW - 5,
            },
        ),
        "allow",
        200,
        "allowed",
    ),
    Case(
        "jwt_authn claims for another audience: the issuer's audiences apply as to a bearer token",
        check_request(
            TRANSFER,
            jwt_payload={
                "iss": "https://idp.example.test",
                "aud": ["other-api"],
                "sub": "carol",
                "roles": ["teller"],
                "scope": "payments",
                "acr": "phr",
                "exp": NOW + 60,
                "auth_time": NOW - 5,
            },
        ),
        "unauthenticated",
        401,
        "wrong_audience",
    ),
    Case(
        "jwt_authn claims without an audience",
        check_request(
            TRANSFER,
            jwt_payload={"iss": "https://idp.example.test", "sub": "carol", "exp": NOW + 60},
        ),
        "unauthenticated",
        401,
        "wrong_audience",
    ),
    Case(
        "jwt_authn claims without exp",
        check_request(
            TRANSFER,
            jwt_payload={"iss": "https://idp.example.test", "aud": "bank-api", "sub": "carol"},
        ),
        "unauthenticated",
        401,
        "invalid_claim",
    ),
    Case(
        "jwt_authn claims past exp + skew",
        check_request(
            TRANSFER,
            jwt_payload={"iss": "https://idp.example.test", "aud": "bank-api", "sub": "c", "exp": NOW - 61},
        ),
        "unauthenticated",
        401,
        "token_expired",
    ),
    Case(
        "jwt_authn claims with nbf in the future",
        check_request(
            TRANSFER,
            jwt_payload={
                "iss": "https://idp.example.test",
                "aud": "bank-api",
                "sub": "c",
                "exp": NOW + 600,
                "nbf": NOW + 120,
            },
        ),
        "unauthenticated",
        401,
        "token_not_yet_valid",
    ),
    Case(
        "jwt_authn claims with iat in the future",
        check_request(
            TRANSFER,
            jwt_payload={
                "iss": "https://idp.example.test",
                "aud": "bank-api",
                "sub": "c",
                "exp": NOW + 600,
                "iat": NOW + 120,
            },
        ),
        "unauthenticated",
        401,
        "token_issued_in_future",
    ),
    Case(
        "jwt_authn claims with an iss that is a list",
        check_request(BALANCE, jwt_payload={"iss": ["https://idp.example.test"], "sub": "x", "exp": NOW + 60}),
        "unauthenticated",
        401,
        "invalid_claim",
    ),
    Case(
        "jwt_authn claims from an unknown issuer",
        check_request(BALANCE, jwt_payload={"iss": "https://evil.test", "sub": "x", "exp": NOW + 60}),
        "unauthenticated",
        401,
        "unknown_issuer",
    ),
    Case(
        "invalid path is refused before lookup",
        check_request("/bank.v1.Accounts/%2e%2e/Admin%2FSet", token=tok()),
        "deny",
        400,
        "invalid_path",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decision_table(engine: Engine, case: Case) -> None:
    attrs = from_check_request(case.request)
    d = engine.decide(attrs, NOW)
    assert (d.outcome.value, d.http_status, d.reason) == (case.outcome, case.status, case.reason)
    www = response.challenge(d, engine.policy.realm) or None
    if case.www is not ...:
        assert www == case.www
    if case.outcome == "allow" or case.reason == "permission_denied":
        assert www is None
    if case.rules is not None:
        assert d.matched_rules == case.rules


def test_permission_denial_carries_no_challenge(engine: Engine) -> None:
    d = engine.decide(from_check_request(check_request(ADMIN, token=tok(acr=ACR_PHRH))), NOW)
    assert response.challenge(d, "bank") == ""
    wire = response.deny(d, "id1", "bank", is_grpc=False)
    assert [h.header.key for h in wire.denied_response.headers] == ["content-type", "cache-control"]


def test_admin_freshness_challenge_has_max_age_900(engine: Engine) -> None:
    d = engine.decide(
        from_check_request(
            check_request(ADMIN, token=tok(roles=["admin"], acr=ACR_PHRH, auth_time=NOW - 1200))
        ),
        NOW,
    )
    assert d.max_age == 900 and d.acr_values == ()


def test_freshness_within_clock_skew_is_accepted(engine: Engine) -> None:
    # max_age 3600 + 60 s skew
    ok = engine.decide(
        from_check_request(check_request(TRANSFER, token=tok(acr=ACR_PHR, auth_time=NOW - 3650))), NOW
    )
    late = engine.decide(
        from_check_request(check_request(TRANSFER, token=tok(acr=ACR_PHR, auth_time=NOW - 3661))), NOW
    )
    assert ok.allowed and late.reason == "auth_too_old"


def test_password_only_login_for_low_operation_sees_no_friction(engine: Engine) -> None:
    d = engine.decide(
        from_check_request(check_request(BALANCE, token=tok(acr=ACR_1FA, auth_time=NOW - 86400 * 3))), NOW
    )
    assert d.allowed
