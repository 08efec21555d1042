"""JWT attacks not covered by tests/test_identity.py: a second trusted issuer with its own acr table
(no cross-issuer keys or acr values), kid injection, claims from jwt_authn metadata, and numbers
that are not finite."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc.jwk import RSAKey, import_key

from sidecar.attributes import from_check_request
from sidecar.compiler import PolicyError, load_policy_text
from sidecar.engine import Engine
from tests.helpers import ACR_PHR, EXAMPLE_POLICY, ISSUER, NOW, PRIVATE_JWK, check_request, make_token

TRANSFER = "/bank.v1.Payments/Transfer"
BALANCE = "/bank.v1.Accounts/GetBalance"
PARTNER = "https://partner.example.test"
PARTNER_KEY = RSAKey.generate_key(2048, parameters={"kid": "partner-1"})
ATTACKER_KEY = RSAKey.generate_key(2048, parameters={"kid": "attacker"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: dict[str, Any], payload: str | dict[str, Any], key: Any = None) -> str:
    """RS256 over any header and payload text (joserfc refuses odd headers and NaN on purpose)."""
    key = key or import_key(PRIVATE_JWK)
    body = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(body.encode())}"
    sig = key.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(sig)}"


def claims(**kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "bank-api",
        "sub": "mallory",
        "iat": NOW - 10,
        "exp": NOW + 600,
        "auth_time": NOW - 10,
        "roles": ["teller"],
        "acr": "urn:okta:loa:1fa:any",
    }
    c.update(kw)
    return c


DEV_HEADER = {"alg": "RS256", "kid": PRIVATE_JWK["kid"], "typ": "JWT"}


@pytest.fixture(scope="module")
def two_issuers(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    d: Path = tmp_path_factory.mktemp("partner")
    (d / "partner-jwks.json").write_text(json.dumps({"keys": [PARTNER_KEY.as_dict(private=False)]}))
    doc = yaml.safe_load(EXAMPLE_POLICY.read_text())
    doc["issuers"].append(
        {
            "id": "partner",
            "issuer": PARTNER,
            "audiences": ["bank-api"],
            "jwks_file": str(d / "partner-jwks.json"),
            "algorithms": ["RS256"],
            "acr": {
                "aal1": {"accept": ["bronze"]},
                "aal2": {"accept": ["silver"]},
                "aal2_phr": {"accept": ["gold"]},
                "aal3": {"accept": ["platinum"]},
            },
        }
    )
    for perm in doc["permissions"]:  # both issuers' roles count (a policy must say so)
        if {"roles", "scopes", "users", "groups"} & perm["allow"].keys():
            perm["allow"]["issuers"] = ["dev", "partner"]
    text = yaml.safe_dump(doc)
    return Engine(load_policy_text(text, file="<two-issuers>", base_dir=EXAMPLE_POLICY.parent))


def test_with_two_issuers_roles_must_say_whose(tmp_path: Path) -> None:
    """A partner IdP's `admin` is not ours: with more than one issuer, a rule naming roles (users,
    groups, scopes) without `issuers` is refused at load, with the place and the fix."""
    (tmp_path / "partner-jwks.json").write_text(json.dumps({"keys": [PARTNER_KEY.as_dict(private=False)]}))
    doc = yaml.safe_load(EXAMPLE_POLICY.read_text())
    doc["issuers"].append(
        {"id": "partner", "issuer": PARTNER, "audiences": ["bank-api"],
         "jwks_file": str(tmp_path / "partner-jwks.json"), "algorithms": ["RS256"],
         "acr": {"aal1": {"accept": ["bronze"]}, "aal2": {"accept": ["silver"]},
                 "aal2_phr": {"accept": ["gold"]}, "aal3": {"accept": ["platinum"]}}}
    )
    with pytest.raises(PolicyError) as e:
        load_policy_text(yaml.safe_dump(doc), file="two.yaml", base_dir=EXAMPLE_POLICY.parent)
    text = str(e.value)
    assert "permissions[2].allow: with more than one issuer, roles must say whose" in text
    assert "permissions[1].allow: with more than one issuer, roles and scopes must say whose" in text
    assert "`issuers: [...]` (one of dev, partner)" in text


def _decide(engine: Engine, token: str, path: str = TRANSFER) -> Any:
    return engine.decide(from_check_request(check_request(path, token=token)), NOW)


def partner_token(**kw: Any) -> str:
    return make_token(iss=PARTNER, key=PARTNER_KEY, header={"kid": "partner-1"}, **kw)


def test_second_issuer_acr_maps_through_its_own_table(two_issuers: Engine) -> None:
    """A partner 'gold' is aal2_phr: a transfer is allowed."""
    d = _decide(two_issuers, partner_token(acr="gold"))
    assert (d.outcome.value, d.reason) == ("allow", "allowed")
    assert d.identity is not None and d.identity.issuer_id == "partner"


def test_first_issuers_acr_means_nothing_from_the_second(two_issuers: Engine) -> None:
    """'phr' proves aal2_phr only for the dev issuer; from the partner it is unknown and the
    challenge asks in the partner's own vocabulary."""
    d = _decide(two_issuers, partner_token(acr=ACR_PHR))
    assert (d.http_status, d.reason, d.acr_values) == (401, "acr_too_low", ("gold", "platinum"))


def test_second_issuers_acr_means_nothing_from_the_first(two_issuers: Engine) -> None:
    d = _decide(two_issuers, make_token(acr="gold"))
    assert (d.http_status, d.reason, d.acr_values) == (401, "acr_too_low", ("phr", "phrh"))


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("partner iss signed with the dev key", make_token(iss=PARTNER, acr="platinum")),
        (
            "partner iss, dev key, partner kid",
            make_token(iss=PARTNER, acr="platinum", header={"kid": "partner-1"}),
        ),
        (
            "dev iss signed with the partner key",
            make_token(acr="phrh", key=PARTNER_KEY, header={"kid": "partner-1"}),
        ),
        (
            "dev iss, partner key, dev kid",
            make_token(acr="phrh", key=PARTNER_KEY),
        ),
    ],
)
def test_keys_do_not_cross_issuers(two_issuers: Engine, name: str, token: str) -> None:
    """Each issuer's tokens verify only with that issuer's keys."""
    d = _decide(two_issuers, token)
    assert d.http_status == 401 and d.error == "invalid_token"
    assert d.reason in ("unknown_key", "bad_signature")


KID_ATTACKS = [
    ("kid path traversal", sign({**DEV_HEADER, "kid": "../../../../dev/null"}, claims()), "unknown_key"),
    ("kid SQL injection", sign({**DEV_HEADER, "kid": "x' OR '1'='1"}, claims()), "unknown_key"),
    ("kid not a string", sign({**DEV_HEADER, "kid": 1}, claims()), "malformed_token"),
    ("kid null", sign({**DEV_HEADER, "kid": None}, claims()), "malformed_token"),
    (
        "embedded jwk header with the attacker's key",
        sign({"alg": "RS256", "jwk": ATTACKER_KEY.as_dict(private=False)}, claims(), ATTACKER_KEY),
        "malformed_token",  # a JWS header over 512 bytes
    ),
    (
        "embedded jwk and its kid",
        sign(
            {"alg": "RS256", "kid": "attacker", "jwk": ATTACKER_KEY.as_dict(private=False)},
            claims(),
            ATTACKER_KEY,
        ),
        "malformed_token",
    ),
    (
        "x5c header with the attacker's key, our kid",
        sign({**DEV_HEADER, "x5c": ["MIIBIjANBgkq"]}, claims(), ATTACKER_KEY),
        "bad_signature",
    ),
    ("no kid, attacker key", sign({"alg": "RS256"}, claims(), ATTACKER_KEY), "bad_signature"),
    ("unknown crit header", sign({**DEV_HEADER, "crit": ["exp"]}, claims()), "malformed_token"),
    (
        "unencoded payload (b64: false)",
        sign({**DEV_HEADER, "b64": False, "crit": ["b64"]}, claims()),
        "malformed_token",
    ),
]


@pytest.mark.parametrize(("name", "token", "reason"), KID_ATTACKS, ids=[k[0] for k in KID_ATTACKS])
def test_key_selection_cannot_be_steered(engine: Engine, name: str, token: str, reason: str) -> None:
    """Keys come only from the issuer's configured set; header hints never add a key."""
    d = _decide(engine, token, BALANCE)
    assert (d.http_status, d.reason, d.error) == (401, reason, "invalid_token")


def test_no_kid_with_the_right_key_verifies(engine: Engine) -> None:
    """Control for the cases above: a missing kid is not by itself an attack."""
    assert _decide(engine, sign({"alg": "RS256"}, claims()), BALANCE).allowed


JWT_AUTHN_BAD = [
    ("iat in the future", {"iat": NOW + 600}, "token_issued_in_future"),
    ("nbf in the future", {"nbf": NOW + 600}, "token_not_yet_valid"),
    ("expired", {"exp": NOW - 600}, "token_expired"),
    ("no exp", {"exp": None}, "invalid_claim"),
    ("auth_time in the future", {"auth_time": NOW + 600}, "invalid_claim"),
    ("acr not a string", {"acr": {"level": "phrh"}}, "invalid_claim"),
    ("amr of the wrong type", {"amr": {"pwd": True}}, "invalid_claim"),
    ("sub missing", {"sub": None}, "invalid_claim"),
]


@pytest.mark.parametrize(("name", "change", "reason"), JWT_AUTHN_BAD, ids=[b[0] for b in JWT_AUTHN_BAD])
def test_jwt_authn_claims_are_checked_like_bearer_claims(
    engine: Engine, name: str, change: dict[str, Any], reason: str
) -> None:
    """Envoy verified the signature; times and claim types are still ours to check."""
    payload = {k: v for k, v in {**claims(), **change}.items() if v is not None}
    d = engine.decide(from_check_request(check_request(BALANCE, jwt_payload=payload)), NOW)
    assert (d.http_status, d.reason) == (401, reason)


NON_FINITE = [
    ("exp NaN", '"exp": NaN'),
    ("exp Infinity", '"exp": Infinity'),
    ("iat NaN", f'"exp": {NOW + 600}, "iat": NaN'),
    ("nbf NaN", f'"exp": {NOW + 600}, "nbf": NaN'),
    ("auth_time NaN", f'"exp": {NOW + 600}, "auth_time": NaN'),
    ("auth_time -Infinity", f'"exp": {NOW + 600}, "auth_time": -Infinity'),
]


@pytest.mark.parametrize(("name", "times"), NON_FINITE, ids=[n[0] for n in NON_FINITE])
def test_non_finite_numbers_in_a_signed_token_are_refused(engine: Engine, name: str, times: str) -> None:
    """NaN/Infinity are not JSON (RFC 8259); a signed token carrying them is refused, not trusted
    forever and not an internal error."""
    payload = (
        f'{{"iss": "{ISSUER}", "aud": "bank-api", "sub": "mallory", "roles": ["teller"], '
        f'"acr": "urn:okta:loa:1fa:any", {times}}}'
    )
    d = _decide(engine, sign(DEV_HEADER, payload), BALANCE)
    assert (d.http_status, d.error) == (401, "invalid_token")
    assert d.reason in ("invalid_claim", "malformed_token", "token_issued_in_future", "token_not_yet_valid")


@pytest.mark.parametrize(
    ("name", "extra", "refused"),
    [
        ("unused claim, lone high surrogate", '"x": "\\ud800"', True),  # `make fuzz`, 2026-12-03
        ("unused claim, lone low surrogate", '"note": ["a", "\\udc00"]', True),
        ("a claim name", '"\\udfff": 1', True),
        ("a pair is one character", '"x": "\\ud83d\\udd12"', False),
        ("upper-case escape digits", '"x": "\\uD800"', True),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_lone_surrogate_anywhere_in_a_signed_token_is_a_malformed_token(
    engine: Engine, name: str, extra: str, refused: bool
) -> None:
    """json.loads takes a lone surrogate escape; it is no text (RFC 8259 §8.2, RFC 7493), and the
    reference evaluator refuses the token: so does the sidecar, whether the claim is used or not."""
    payload = (
        f'{{"iss": "{ISSUER}", "aud": "bank-api", "sub": "mallory", "roles": ["teller"], "amr": ["pwd"],'
        f' "exp": {NOW + 600}, {extra}}}'
    )
    d = _decide(engine, sign(DEV_HEADER, payload), BALANCE)
    if refused:
        assert (d.http_status, d.reason, d.error) == (401, "malformed_token", "invalid_token")
    else:
        assert (d.http_status, d.reason) == (200, "allowed")
