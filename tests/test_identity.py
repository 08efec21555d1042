"""Bearer JWT verification: every bad token is refused with a specific reason; good ones are cached."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from joserfc.jwk import ECKey, RSAKey

from sidecar.attributes import from_check_request
from sidecar.compiler import load_policy, load_policy_text
from sidecar.engine import Engine
from sidecar.identity import AuthError
from sidecar.policy import Policy
from sidecar.tokens import Verifier
from tests.helpers import (
    EXAMPLE_POLICY,
    NOW,
    PRIVATE_JWK,
    FixedClock,
    check_request,
    example_policy_text,
    make_token,
)

BALANCE = "/bank.v1.Accounts/GetBalance"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], sig: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(sig)}"


def _claims(**kw: Any) -> dict[str, Any]:
    c = {
        "iss": "https://idp.example.test",
        "aud": "bank-api",
        "sub": "mallory",
        "exp": NOW + 600,
        "roles": ["admin"],
        "acr": "phrh",
        "auth_time": NOW,
    }
    c.update(kw)
    return c


def _hs256_with_public_key() -> str:
    pub = RSAKey.import_key({k: v for k, v in PRIVATE_JWK.items() if k in ("kty", "n", "e", "kid")})
    secret = pub.as_pem(private=False)
    header = {"alg": "HS256", "kid": PRIVATE_JWK["kid"], "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


OTHER_RSA = RSAKey.generate_key(2048, parameters={"kid": PRIVATE_JWK["kid"]})

BAD_TOKENS = [
    ("expired", make_token(exp=NOW - 120), "token_expired"),
    ("not yet valid", make_token(nbf=NOW + 600), "token_not_yet_valid"),
    ("issued in the future", make_token(iat=NOW + 600), "token_issued_in_future"),
    ("auth_time in the future", make_token(auth_time=NOW + 600), "invalid_claim"),
    ("wrong issuer", make_token(iss="https://evil.example"), "unknown_issuer"),
    ("wrong audience", make_token(aud="other-api"), "wrong_audience"),
    ("audience list without ours", make_token(aud=["a", "b"]), "wrong_audience"),
    ("no exp", make_token(drop=("exp",)), "invalid_claim"),
    ("exp not a number", make_token(exp="tomorrow"), "invalid_claim"),
    ("no subject", make_token(drop=("sub",)), "invalid_claim"),
    ("acr not a string", make_token(acr={"level": 3}), "invalid_claim"),
    ("amr of the wrong type", make_token(amr=7), "invalid_claim"),
    ("amr list holding a number", make_token(amr=["pwd", 1]), "invalid_claim"),
    ("roles of the wrong type", make_token(roles=7), "invalid_claim"),
    ("unknown kid", make_token(header={"kid": "nope"}), "unknown_key"),
    ("signed by another key with our kid", make_token(key=OTHER_RSA), "bad_signature"),
    ("alg none", _unsigned({"alg": "none", "typ": "JWT"}, _claims()), "disallowed_algorithm"),
    ("alg None capitalised", _unsigned({"alg": "None"}, _claims()), "disallowed_algorithm"),
    ("HS256 signed with the RSA public key", _hs256_with_public_key(), "disallowed_algorithm"),
    (
        "ES256 not in the issuer's allow-list",
        make_token(header={"alg": "ES256"}, key=ECKey.generate_key("P-256")),
        "disallowed_algorithm",
    ),
    ("garbage", "garbage", "malformed_token"),
    ("three garbage parts", "a.b.c", "malformed_token"),
    (
        "payload not an object",
        _b64(b'{"alg":"RS256"}') + "." + _b64(b"[1]") + "." + _b64(b"x"),
        "malformed_token",
    ),
    (
        "tampered payload",
        (
            lambda t: (
                t.split(".")[0]
                + "."
                + _b64(json.dumps(_claims(roles=["admin"])).encode())
                + "."
                + t.split(".")[2]
            )
        )(make_token()),
        "bad_signature",
    ),
    (
        "jku header pointing elsewhere is ignored, signature still checked",
        make_token(header={"jku": "https://evil.example/jwks.json", "kid": "evil"}, key=OTHER_RSA),
        "unknown_key",
    ),
    ("oversized token (over 8 KiB)", make_token(pad="x" * 7000), "malformed_token"),
]


@pytest.mark.parametrize(("name", "token", "reason"), BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
def test_bad_tokens_are_refused(engine: Engine, name: str, token: str, reason: str) -> None:
    d = engine.decide(from_check_request(check_request(BALANCE, token=token)), NOW)
    assert (d.http_status, d.reason, d.error) == (401, reason, "invalid_token")


def test_good_token_yields_identity(example_policy: Policy) -> None:
    ident = example_policy.identities.from_bearer(
        make_token(sub="bob", roles=["teller", "auditor"], scope="payments read", amr=["pwd", "otp"]),
        Verifier(),
        "",
        NOW,
    )
    assert ident.subject == "bob"
    assert ident.roles == {"teller", "auditor"}
    assert ident.scopes == {"payments", "read"}
    assert ident.amr == ("pwd", "otp")
    assert example_policy.levels[ident.level or 0] == "aal1" and ident.level_source == "acr"


def test_verified_tokens_are_cached_until_expiry() -> None:
    clock = FixedClock(NOW)
    policy = load_policy(EXAMPLE_POLICY)
    ids, verifier = policy.identities, Verifier()
    token = make_token(exp=NOW + 100)
    first = ids.from_bearer(token, verifier, "", clock.now)
    assert ids.from_bearer(token, verifier, "", clock.now) is first  # served from the memo
    assert verifier.verifications == 1
    clock.now = NOW + 100 + 61  # past exp + skew: the memo entry expires, the claims are refused
    with pytest.raises(AuthError) as e:
        ids.from_bearer(token, verifier, "", clock.now)
    assert e.value.code == "token_expired"
    assert verifier.verifications == 1  # the signature was not checked again


def test_cached_identity_takes_the_calls_own_principal(example_policy: Policy) -> None:
    token = make_token()
    verifier = Verifier()
    a = example_policy.identities.from_bearer(token, verifier, "spiffe://a", NOW)
    b = example_policy.identities.from_bearer(token, verifier, "spiffe://b", NOW)
    assert (a.principal, b.principal) == ("spiffe://a", "spiffe://b")


def test_entra_style_acrs_list_takes_the_strongest_mapped_value(tmp_path: Any) -> None:
    policy = load_policy_text(example_policy_text(("acr: acr", "acr: acrs")))
    ident = policy.identities.from_bearer(
        make_token(drop=("acr",), acrs=["urn:okta:loa:1fa:any", "phr"]), Verifier(), "", NOW
    )
    assert policy.levels[ident.level or 0] == "aal2_phr"


def test_nested_claim_paths(tmp_path: Any) -> None:
    policy = load_policy_text(example_policy_text(("roles: roles", "roles: realm_access.roles")))
    ident = policy.identities.from_bearer(
        make_token(drop=("roles",), realm_access={"roles": ["teller"]}), Verifier(), "", NOW
    )
    assert ident.roles == {"teller"}


def test_oversized_header_is_a_bad_request(engine: Engine) -> None:
    d = engine.decide(from_check_request(check_request(BALANCE, token=make_token(pad="x" * 20000))), NOW)
    assert (d.http_status, d.reason) == (400, "invalid_header")
