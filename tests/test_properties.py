"""Property-based tests of the Check handler against an independent reference (tests/reference.py).

Hypothesis builds requests from the example policy's operations bent by hostile fragments
(DESIGN.md §5, spec-issue8): dot segments in every spelling, `//`, refused and decoded escapes,
odd query strings, odd and lower-case methods, control characters and invalid UTF-8 in headers,
repeated / comma-joined / case-variant `Authorization`, tokens with wrong claim types, huge
numbers, deep nesting, wrong algorithms and keys, Envoy jwt_authn metadata claims, mTLS
principals, sources inside and outside the trusted networks, route context extensions.

For each request the handler (AuthorizationServicer.Check, fed the request after a wire round
trip; the sidecar is a black box here) must:

- return a well-formed CheckResponse, never `internal_error` (the internal-error counter stays 0);
- give the reference's outcome, HTTP status and reason code (or one the reference lists as
  equally right), the same challenge error code, and the same `acr_values` / `max_age` (and
  `scope`) in `www-authenticate`, the same reason in the JSON body for HTTP callers and in the
  dynamic metadata, and on allow the reference's subject and assurance level.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from sidecar._proto.envoy.config.core.v3 import base_pb2
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2
from sidecar.compiler import load_policy
from sidecar.runtime import Runtime
from sidecar.server import AuthorizationServicer
from sidecar.telemetry import Metrics, Telemetry
from tests.helpers import (
    ACR_1FA,
    ACR_2FA,
    ACR_PHR,
    ACR_PHRH,
    EXAMPLE_POLICY,
    ISSUER,
    NOW,
    PRIVATE_JWK,
    FixedClock,
    check_request,
)
from tests.reference import RefAnswer, Reference, error_for

POLICY_DOC = yaml.safe_load(EXAMPLE_POLICY.read_text())
JWKS = json.loads((EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json").read_text())
REF = Reference(POLICY_DOC, JWKS, NOW)
GRPC_CODE = {400: 3, 401: 16, 403: 7}
IDENTITY_HEADERS = list(POLICY_DOC["upstream_headers"].values())
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
KID = PRIVATE_JWK["kid"]
LEDGER = "spiffe://cluster.local/ns/bank/sa/ledger"
ACR_MFA = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"


# --------------------------------------------------------------------------------------------
# Signing (test side: raw JOSE, so that any header and payload text can be signed)
# --------------------------------------------------------------------------------------------


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64u_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def _dev_private_key() -> rsa.RSAPrivateKey:
    j = PRIVATE_JWK
    public = rsa.RSAPublicNumbers(_b64u_int(j["e"]), _b64u_int(j["n"]))
    numbers = rsa.RSAPrivateNumbers(
        p=_b64u_int(j["p"]),
        q=_b64u_int(j["q"]),
        d=_b64u_int(j["d"]),
        dmp1=_b64u_int(j["dp"]),
        dmq1=_b64u_int(j["dq"]),
        iqmp=_b64u_int(j["qi"]),
        public_numbers=public,
    )
    return numbers.private_key()


SIGNERS = {"dev": _dev_private_key(), "other": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
_OTHER_PUB = SIGNERS["other"].public_key().public_numbers()
OTHER_PUBLIC_JWK = {
    "kty": "RSA",
    "kid": KID,
    "n": _b64u(_OTHER_PUB.n.to_bytes(256, "big")),
    "e": _b64u(_OTHER_PUB.e.to_bytes(3, "big")),
}
_SIGNED: dict[tuple[bytes, bytes, str], str] = {}


def jws(header: bytes, payload: bytes, signer: str) -> str:
    """A compact JWS over exactly these header and payload bytes."""
    key = (header, payload, signer)
    if key not in _SIGNED:
        signing_input = (_b64u(header) + "." + _b64u(payload)).encode()
        if signer == "none":
            sig = b""
        elif signer == "hs256":
            sig = hmac.new(b"secret", signing_input, hashlib.sha256).digest()
        else:
            sig = SIGNERS[signer].sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        _SIGNED[key] = signing_input.decode() + "." + _b64u(sig)
    return _SIGNED[key]


def obj_text(pairs: dict[str, str]) -> str:
    """A JSON object from member names and raw JSON value texts (so that 10**400, NaN, a lone
    surrogate escape or 5000 levels of nesting can be written)."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs.items()) + "}"


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


def chance(draw: st.DrawFn, percent: int) -> bool:
    """True with about `percent` % probability; False for hypothesis' favourite (zero) draws, so the
    benign branch is the simple one that shrinking moves towards."""
    return draw(st.integers(0, 99)) >= 100 - percent


J = json.dumps
DROP = "<drop>"
# Far deeper than any JSON parser takes (the reference stops at 256, Python's json near 1000), and
# short enough that a token stays well under 16 KiB (the spec sets no header size limit, so the
# generators stay clear of one).
DEEP_LIST = "[" * 2000 + "]" * 2000
DEEP_OBJ = '{"a":' * 1200 + "1" + "}" * 1200
# (label, claim, raw JSON text or DROP)
HOSTILE_CLAIMS = [
    ("iss-list", "iss", J([ISSUER])),
    ("iss-object", "iss", J({"iss": ISSUER})),
    ("iss-evil", "iss", J("https://evil.example")),
    ("iss-trailing-slash", "iss", J(ISSUER + "/")),
    ("iss-missing", "iss", DROP),
    ("aud-object", "aud", J({"aud": "bank-api"})),
    ("aud-list-ok", "aud", J(["other-api", "bank-api"])),
    ("aud-wrong", "aud", J("other-api")),
    ("aud-list-wrong", "aud", J(["other-api"])),
    ("aud-number", "aud", "5"),
    ("aud-missing", "aud", DROP),
    ("sub-missing", "sub", DROP),
    ("sub-empty", "sub", J("")),
    ("sub-number", "sub", "5"),
    ("sub-list", "sub", J(["alice"])),
    ("sub-lone-surrogate", "sub", '"\\ud800"'),
    ("roles-string-two-words", "roles", J("teller admin")),
    ("roles-string-admin", "roles", J("admin")),
    ("roles-string-teller", "roles", J("teller")),
    ("roles-number", "roles", "5"),
    ("roles-list-number", "roles", "[1]"),
    ("roles-object", "roles", J({"admin": True})),
    ("roles-nested-list", "roles", J([["admin"]])),
    ("roles-null", "roles", "null"),
    ("groups-number", "groups", "5"),
    ("amr-object", "amr", J({"m": "hwk"})),
    ("amr-number", "amr", "1"),
    ("amr-mixed-list", "amr", J(["hwk", 1])),
    ("scope-number", "scope", "7"),
    ("scope-object", "scope", J({"payments": True})),
    ("exp-10**400", "exp", str(10**400)),
    ("exp--10**400", "exp", "-" + str(10**400)),
    ("exp-1e400", "exp", "1e400"),
    ("exp-NaN", "exp", "NaN"),
    ("exp-string", "exp", J(str(NOW + 600))),
    ("exp-true", "exp", "true"),
    ("exp-null", "exp", "null"),
    ("exp-2**53", "exp", str(2**53)),
    ("exp-2**53-1", "exp", str(2**53 - 1)),
    ("exp-float", "exp", f"{NOW + 600}.5"),
    ("exp-exponent", "exp", "1.8000006e9"),
    ("exp-missing", "exp", DROP),
    ("auth_time-10**400", "auth_time", str(10**400)),
    ("auth_time-Infinity", "auth_time", "Infinity"),
    ("auth_time-future", "auth_time", str(NOW + 600)),
    ("auth_time-near-future", "auth_time", str(NOW + 30)),
    ("auth_time-string", "auth_time", J(str(NOW))),
    ("auth_time-false", "auth_time", "false"),
    ("nbf-future", "nbf", str(NOW + 600)),
    ("nbf-near-future", "nbf", str(NOW + 30)),
    ("nbf-string", "nbf", J("0")),
    ("iat-future", "iat", str(NOW + 600)),
    ("iat-near-future", "iat", str(NOW + 30)),
    ("iat-10**400", "iat", str(10**400)),
    ("nested-20", "x", "[" * 20 + "]" * 20),
    ("nested-list-2000", "x", DEEP_LIST),
    ("nested-object-1200", "x", DEEP_OBJ),
    ("roles-nested-2000", "roles", DEEP_LIST),
]
# (label, header JSON text, signer)
HOSTILE_HEADERS = [
    ("alg-none", J({"alg": "none", "typ": "JWT"}), "none"),
    ("alg-none-kid", J({"alg": "none", "kid": KID}), "none"),
    ("alg-HS256", J({"alg": "HS256", "kid": KID}), "hs256"),
    ("alg-RS512", J({"alg": "RS512", "kid": KID}), "dev"),
    ("alg-ES256", J({"alg": "ES256", "kid": KID}), "dev"),
    ("alg-list", J({"alg": ["RS256"], "kid": KID}), "dev"),
    ("alg-missing", J({"kid": KID}), "dev"),
    ("kid-unknown", J({"alg": "RS256", "kid": "nope"}), "dev"),
    ("kid-number", J({"alg": "RS256", "kid": 5}), "dev"),
    ("jwk-embedded", J({"alg": "RS256", "kid": KID, "jwk": OTHER_PUBLIC_JWK}), "other"),
    ("jku", J({"alg": "RS256", "kid": KID, "jku": "https://evil.example/jwks"}), "other"),
    ("typ-other", J({"alg": "RS256", "kid": KID, "typ": "at+jwt"}), "dev"),
    ("header-list", J(["RS256"]), "dev"),
    ("header-string", J("RS256"), "dev"),
    ("header-nested-2000", '{"alg":"RS256","kid":' + J(KID) + ',"x":' + DEEP_LIST + "}", "dev"),
]


class Tok:
    """A generated token and a short description of it (the token itself can be 15 kB)."""

    def __init__(self, label: str, token: str) -> None:
        self.label = label
        self.token = token

    def __repr__(self) -> str:
        return f"Tok({self.label!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


@st.composite
def tokens(draw: st.DrawFn, deep_allowed: bool = True) -> Tok:
    age = draw(st.sampled_from([10, None, 0, 100, 900, 960, 1000, 1830, 1900, 3650, 3700, 7200, 43000, 44000, -30]))
    claims: dict[str, str] = {
        "iss": J(ISSUER),
        "aud": J("bank-api"),
        "sub": J(draw(st.sampled_from(["alice", "bob"]))),
        "iat": str(NOW - 10),
        "exp": str(NOW + draw(st.sampled_from([600, 30, -30, -61, -120]))),
        "roles": J(
            draw(
                st.sampled_from(
                    [["teller"], ["customer"], ["admin"], ["teller", "admin"], ["auditor"], ["teller", "customer"]]
                )
            )
        ),
        "scope": J(draw(st.sampled_from(["payments", "", "read payments", "pay", ["payments"], ["read", "pay"]]))),
    }
    if age is not None:
        claims["auth_time"] = str(NOW - age)
    acr = draw(
        st.sampled_from(
            [ACR_1FA, None, "", ACR_2FA, ACR_MFA, ACR_PHR, ACR_PHRH, "gold", [ACR_PHR], ["gold", ACR_PHRH], "urn:okta:loa:1fa:pwd", "0"]
        )
    )
    if acr is not None:
        claims["acr"] = J(acr)
    amr = draw(
        st.sampled_from(
            [["pwd"], None, [], ["pwd", "otp"], ["mfa"], ["hwk", "face"], ["foo"], ["sms"], "pwd", "hwk", ["hwk", "pin"],
             ["pwd", "user"], ["hwk", "user"], ["rba"], [""], ["pwd", "bio"]]
        )
    )
    if amr is not None:
        claims["amr"] = J(amr)
    labels = [f"age={age} acr={acr} amr={amr}"]
    deep = False
    if chance(draw, 30):
        for label, name, text in draw(st.lists(st.sampled_from(HOSTILE_CLAIMS), min_size=1, max_size=2)):
            if "nested" in label and (deep or not deep_allowed):
                continue
            deep = deep or "nested" in label
            labels.append(label)
            if text == DROP:
                claims.pop(name, None)
            else:
                claims[name] = text
    header = J({"alg": "RS256", "kid": KID, "typ": "JWT"})
    signer = "dev"
    if chance(draw, 10):
        label, header, signer = draw(st.sampled_from(HOSTILE_HEADERS))
        if "nested" in label and (deep or not deep_allowed):
            label, header, signer = HOSTILE_HEADERS[0]
        labels.append(label)
    elif chance(draw, 5):
        signer = "other"
        labels.append("bad-signature")
    payload = obj_text(claims).encode()
    if chance(draw, 6):
        shape = draw(
            st.sampled_from(
                ["a.b.c", "two-parts", "five-parts", "bang", "payload-list", "payload-trailing", "payload-bad-utf8", "empty-sig", "padded"]
            )
        )
        labels.append(shape)
        if shape == "a.b.c":
            return Tok(" ".join(labels), "a.b.c")
        if shape == "payload-list":
            payload = b"[1]"
        elif shape == "payload-trailing":
            payload = payload + b"x"
        elif shape == "payload-bad-utf8":
            payload = payload[:-1] + b',"n":"\xff"}'
        token = jws(header.encode(), payload, signer)
        if shape == "two-parts":
            token = token.rsplit(".", 1)[0]
        elif shape == "five-parts":
            token = token + ".e30.e30"
        elif shape == "bang":
            token = token[:-3] + "!" + token[-2:]
        elif shape == "empty-sig":
            token = token.rsplit(".", 1)[0] + "."
        elif shape == "padded":
            token = token + "=="
        return Tok(" ".join(labels), token)
    return Tok(" ".join(labels), jws(header.encode(), payload, signer))


@st.composite
def jwt_authn_payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """Claims as Envoy's jwt_authn stores them (a Struct: every number a double)."""
    age = draw(st.sampled_from([10, None, 1000, 3700, 44000]))
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "bank-api",
        "sub": "carol",
        "iat": NOW - 10,
        "exp": NOW + draw(st.sampled_from([600, -30, -120])),
        "roles": draw(st.sampled_from([["teller"], ["admin"], ["customer"], "teller admin", "teller"])),
        "scope": draw(st.sampled_from(["payments", "", ["payments"]])),
        "acr": draw(st.sampled_from([ACR_PHR, ACR_1FA, ACR_PHRH, ACR_2FA])),
        "amr": ["hwk"],
    }
    if age is not None:
        claims["auth_time"] = NOW - age
    if chance(draw, 40):
        label, value = draw(
            st.sampled_from(
                [
                    ("aud-wrong", "other-api"),
                    ("aud-missing", DROP),
                    ("aud-list-ok", ["x", "bank-api"]),
                    ("aud-object", {"aud": "bank-api"}),
                    ("iss-evil", "https://evil.example"),
                    ("iss-list", [ISSUER]),
                    ("iss-missing", DROP),
                    ("exp-missing", DROP),
                    ("exp-bool", True),
                    ("exp-huge", 1e300),
                    ("exp-string", str(NOW + 600)),
                    ("auth_time-huge", 1e300),
                    ("auth_time-future", NOW + 600),
                    ("nbf-future", NOW + 600),
                    ("sub-missing", DROP),
                    ("sub-number", 5),
                    ("roles-number", 5),
                    ("amr-object", {"m": 1}),
                ]
            )
        )
        name = label.split("-")[0]
        if value == DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    key = "jwt_payload" if not chance(draw, 10) else "some_other_provider"
    return key, claims


SEGMENTS = ["v1", "accounts", "7", "balance", "admin", "users", "transfers", "healthz", "x", "bank.v1.Admin"]
HOSTILE = [
    "..",
    ".",
    "",
    "...",
    "%2e",
    "%2E",
    "%2e%2e",
    "%2E%2E",
    "%2E.",
    ".%2e",
    "%2F",
    "%2f",
    "%5C",
    "%5c",
    "%00",
    "%0a",
    "%7F",
    "%25",
    "%2525",
    "%3B",
    "%3b",
    ";x",
    "..;",
    "%3A",
    "%40",
    "%21",
    "%24",
    "%26",
    "%27",
    "%28",
    "%29",
    "%2A",
    "%2B",
    "%2C",
    "%3D",
    "a%3Ab",
    "a:b",
    "@",
    "%7E",
    "%41",
    "%61dmin",
    "%62alance",
    "%c3%a9",
    "%C3%A9",
    "%c0%ae",
    "%ff",
    "%zz",
    "%",
    "%4",
    "%20",
    "%3F",
    "%23",
    "%5B",
    "%7C",
    "%7B",
    "%5E",
    "[",
    "|",
    "{",
    "^",
    "a b",
    "\u00e9",
    "\\",
    "\t",
    "ADMIN",
    "Admin",
]
SUFFIXES = [
    "?q=/../v1/admin",
    "#/../admin",
    "/",
    "//",
    "/.",
    "/..",
    "/%2e",
    "?",
    "#",
    "?a=[1]|{x}^",
    '?q="<>"',
    "?q=\u00e9",
    "?q=%00",
    "?q=a b",
    "?q=\x7f",
    "?q=\t",
    "#frag?x",
    "?x=1#y",
    "?_method=DELETE",
    "/",
]
PREFIXES = ["/healthz/..", "/v1/accounts/%2e%2e/..", "//", "/.", "/./", "/%2e/", "/v1/..", "/%2E%2E"]
OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/v1/accounts/7/balance"),
    ("GET", "/v1/accounts/7"),
    ("GET", "/v1/accounts"),
    ("GET", "/v1/accounts/7/history/2024"),
    ("POST", "/v1/transfers"),
    ("GET", "/v1/admin/users"),
    ("GET", "/v1/admin"),
    ("DELETE", "/v1/admin/users/3"),
    ("POST", "/bank.v1.Accounts/GetBalance"),
    ("POST", "/bank.v1.Accounts/GetBalance"),
    ("POST", "/bank.v1.Accounts/List"),
    ("POST", "/bank.v1.Payments/Transfer"),
    ("POST", "/bank.v1.Payments/Transfer"),
    ("POST", "/bank.v1.Admin/SetPermissions"),
    ("POST", "/bank.v1.Admin/List"),
    # Rules with reserved characters exist in the variant policy only.
    ("POST", "/v1/accounts/7:freeze"),
    ("GET", "/v1/users/@me"),
]
UNMATCHED_OPERATIONS = [
    ("GET", "/"),
    ("POST", "/bank.v1.Payments/GetBalance"),
    ("POST", "/bank.v1.Vault/List"),
    ("POST", "/bank.v1.Accounts"),
    ("POST", "/v1/accounts/7/balance"),
    ("GET", "/v1/transfers"),
    ("GET", "/healthz/x"),
]
METHODS = [
    "get",
    "Get",
    "post",
    "PUT",
    "PATCH",
    "DELETE",
    "HEAD",
    "OPTIONS",
    "FOO",
    "M-SEARCH",
    "",
    "*",
    "G T",
    "GET ",
    "GET\t",
    "GET\n",
    "GET,POST",
    'G"T',
    "GET/",
    "G\u00c9T",
    "X" * 32,
    "X" * 33,
    "~!#$%&'*+-.^_`|",
]


@st.composite
def operations(draw: st.DrawFn) -> tuple[str, str]:
    """A real operation, often bent by hostile fragments, or a path made of loose segments."""
    if not chance(draw, 15):
        method, path = draw(st.sampled_from(UNMATCHED_OPERATIONS if chance(draw, 10) else OPERATIONS))
        if chance(draw, 25):
            segs = path.split("/")
            at = draw(st.integers(1, len(segs)))
            segs.insert(at, draw(st.sampled_from(HOSTILE)))
            path = "/".join(segs)
        if chance(draw, 15):
            # Escape one character of the path (any: '/', '.', a letter), in either hex case.
            at = draw(st.integers(0, len(path) - 1))
            hex2 = f"{ord(path[at]):02X}" if ord(path[at]) < 0x80 else "C3"
            if chance(draw, 50):
                hex2 = hex2.lower()
            path = path[:at] + "%" + hex2 + path[at + 1 :]
        if chance(draw, 8):
            path = draw(st.sampled_from(PREFIXES)) + path
    else:
        method = draw(st.sampled_from(["GET", "POST"]))
        segs = draw(st.lists(st.sampled_from(SEGMENTS + HOSTILE), min_size=0, max_size=6))
        path = "/" + "/".join(segs)
    if chance(draw, 15):
        path += draw(st.sampled_from(SUFFIXES))
    if chance(draw, 3):
        # Around the 8192-character limit (the whole raw :path, query included).
        fill = 8192 - len(path) - 1 + draw(st.sampled_from([0, 1]))
        path = path + draw(st.sampled_from(["/", "?"])) + "a" * max(fill, 0)
    if chance(draw, 12):
        method = draw(st.sampled_from(METHODS))
    return method, path


AUTH_FORMS = ["none", "bearer", "bearer", "bearer", "bearer", "bearer", "bearer", "bearer", "bearer", "lower"]
ODD_AUTH_FORMS = ["upper", "two-spaces", "twice", "joined", "case-variant-keys", "basic", "empty", "scheme-only", "crlf", "nul"]


@dataclass
class Req:
    method: str
    path: str
    content_type: str
    form: str  # "headers" or "header_map"
    auth: str  # one of AUTH_FORMS
    token: Tok | None
    principal: str
    source: str
    extra: dict[str, str] = field(default_factory=dict)
    raw_extra: tuple[tuple[str, bytes], ...] = ()
    extensions: dict[str, str] = field(default_factory=dict)
    jwt_authn: tuple[str, dict[str, Any]] | None = None


PRINCIPALS = [
    "",
    "",
    "",
    LEDGER,
    LEDGER,
    LEDGER + "x",
    LEDGER + "/",
    LEDGER.upper(),
    "spiffe://cluster.local/ns/bank/sa/(ledger)",
    "spiffe://cluster.local/ns/bank/sa/.*",
]
BATCH = "spiffe://cluster.local/ns/bank/sa/batch-"


@st.composite
def requests(draw: st.DrawFn, principals: tuple[str, ...] = tuple(PRINCIPALS)) -> Req:
    auth = draw(st.sampled_from(ODD_AUTH_FORMS if chance(draw, 15) else AUTH_FORMS))
    extra: dict[str, str] = {}
    for name in draw(
        st.lists(
            st.sampled_from(
                [
                    "x-auth-subject",
                    "x-auth-assurance",
                    "x-envoy-original-path",
                    "x-forwarded-for",
                    "x-note",
                    "x-forwarded-client-cert",
                    "x-device-id",
                    "traceparent",
                    "x-http-method-override",
                ]
            ),
            max_size=2,
            unique=True,
        )
    ):
        clean = ["admin", "/healthz", "10.0.0.1", "a\tb", f"URI={LEDGER}", "laptop-7f3a", "\u00e9t\u00e9", "x y"]
        hostile = ["a\x00b", "a\r\nb", "a\nb", "a\rb", "\x7f", "a\x01b", "a\x1bb"]
        extra[name] = draw(st.sampled_from(hostile if chance(draw, 8) else clean))
    form = draw(st.sampled_from(["headers", "header_map"]))
    raw_extra: tuple[tuple[str, bytes], ...] = ()
    if form == "header_map" and chance(draw, 6):
        raw_extra = ((draw(st.sampled_from(["x-raw", "x-device-id"])), draw(st.sampled_from([b"\xc3\x28", b"\xff", b"\xc0\xae", b"caf\xc3\xa9"]))),)
    method, path = draw(operations())
    if path.startswith("/bank.") and not chance(draw, 20):
        content_type = draw(st.sampled_from(["application/grpc", "application/grpc", "application/grpc+proto"]))
    else:
        content_type = draw(st.sampled_from(["", "application/json"]))
    extensions: dict[str, str] = {}
    if chance(draw, 12):
        key = "sensitivity" if not chance(draw, 20) else "tier"
        extensions[key] = draw(st.sampled_from(["public", "low", "personal", "high", "critical", "bogus"]))
    return Req(
        method=method,
        path=path,
        content_type=content_type,
        form=form,
        auth=auth,
        # A repeated credential doubles the header: no deeply nested token there (header size).
        token=draw(tokens(deep_allowed=auth not in ("twice", "joined")))
        if auth not in ("none", "basic", "empty", "scheme-only")
        else None,
        principal=draw(st.sampled_from(principals)),
        source=draw(
            st.sampled_from(
                [
                    "127.0.0.1",
                    "127.0.0.1",
                    "10.1.2.3",
                    "10.255.255.255",
                    "11.0.0.1",
                    "9.255.255.255",
                    "203.0.113.9",
                    "",
                    "::1",
                    "::2",
                    "::ffff:127.0.0.1",
                    "::ffff:10.0.0.1",
                    "::ffff:203.0.113.9",
                    "2001:db8::1",
                    "bogus",
                ]
            )
        ),
        extra=extra,
        raw_extra=raw_extra,
        extensions=extensions,
        jwt_authn=draw(jwt_authn_payloads()) if chance(draw, 15) else None,
    )


def to_check_request(r: Req) -> Any:
    tok = r.token.token if r.token is not None else ""
    auth_values = {
        "none": [],
        "bearer": [f"Bearer {tok}"],
        "lower": [f"bearer {tok}"],
        "upper": [f"BEARER {tok}"],
        "two-spaces": [f"Bearer  {tok}"],
        "twice": [f"Bearer {tok}", f"Bearer {tok}"],
        "joined": [f"Bearer {tok},Bearer {tok}"],
        "case-variant-keys": [f"Bearer {tok}"],
        "basic": ["Basic YTpi"],
        "empty": ["Bearer "],
        "scheme-only": ["Bearer"],
        "crlf": [f"Bearer {tok}\r\nx-evil: 1"],
        "nul": [f"Bearer {tok}\x00"],
    }[r.auth]
    pairs: list[tuple[str, str]] = [("authorization", v) for v in auth_values] + list(r.extra.items())
    if r.content_type:
        pairs.append(("content-type", r.content_type))
    headers: dict[str, str] = {}
    header_map = None
    if r.form == "header_map":
        header_map = [(k, v.encode()) for k, v in pairs] + list(r.raw_extra)
        if r.auth == "case-variant-keys":
            header_map.append(("Authorization", f"Bearer {tok}".encode()))
    else:
        for k, v in pairs:
            headers[k] = f"{headers[k]},{v}" if k in headers else v  # Envoy comma-joins repeats
        if r.auth == "case-variant-keys":
            headers["Authorization"] = f"Bearer {tok}"
    req = check_request(
        r.path,
        method=r.method,
        headers=headers,
        header_map=header_map,
        grpc=False,
        source=r.source,
        principal=r.principal,
        context_extensions=r.extensions or None,
    )
    if r.jwt_authn is not None:
        key, claims = r.jwt_authn
        s = struct_pb2.Struct()
        s.update({key: claims})
        req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(s)
    return external_auth_pb2.CheckRequest.FromString(req.SerializeToString())


# --------------------------------------------------------------------------------------------
# The handler under test (a black box)
# --------------------------------------------------------------------------------------------


class Handler:
    def __init__(self, policy_path: Path = EXAMPLE_POLICY) -> None:
        self.metrics = Metrics()
        telemetry = Telemetry(None, decision_log=None, metrics=self.metrics)
        self.servicer = AuthorizationServicer(Runtime(load_policy(policy_path), telemetry, FixedClock(NOW)))
        self.loop = asyncio.new_event_loop()

    def check(self, req: Any) -> Any:
        return self.loop.run_until_complete(self.servicer.Check(req, None))

    def internal_errors(self) -> float:
        return self.metrics.registry.get_sample_value("stepup_internal_errors_total") or 0.0

    def close(self) -> None:
        self.loop.close()


@pytest.fixture(scope="module")
def handler() -> Iterator[Handler]:
    h = Handler()
    yield h
    h.close()


# --------------------------------------------------------------------------------------------
# Reading the answer
# --------------------------------------------------------------------------------------------

_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)=("(?:[^"\\]|\\.)*"|[^,\s]*)')


def challenge_params(value: str) -> dict[str, str]:
    """The auth-params of a `Bearer ...` challenge."""
    assert value.startswith("Bearer"), value
    out: dict[str, str] = {}
    for name, raw in _PARAM.findall(value[len("Bearer") :]):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        assert name not in out, f"parameter {name} twice in {value!r}"
        out[name] = raw
    return out


@dataclass(frozen=True)
class Observed:
    outcome: str
    http_status: int
    reason: str
    error: str
    acr_values: tuple[str, ...]
    max_age: int | None
    scope: tuple[str, ...]
    params: dict[str, str] = field(compare=False)
    upstream: dict[str, str] = field(compare=False)
    removed: tuple[str, ...] = field(compare=False, default=())
    overwrite: dict[str, bool] = field(compare=False, default_factory=dict)


def observe(resp: Any, is_grpc: bool) -> Observed:
    """Check that the CheckResponse is well formed and read what it says."""
    meta = resp.dynamic_metadata.fields
    assert "reason" in meta and "outcome" in meta and "decision_id" in meta, resp
    if resp.status.code == 0:
        assert resp.HasField("ok_response") and not resp.HasField("denied_response")
        upstream = {h.header.key: h.header.value for h in resp.ok_response.headers}
        overwrite = {h.header.key: h.append_action == OVERWRITE for h in resp.ok_response.headers}
        outcome = meta["outcome"].string_value
        assert outcome == "allow", outcome
        removed = tuple(resp.ok_response.headers_to_remove)
        return Observed("allow", 200, meta["reason"].string_value, "", (), None, (), {}, upstream, removed, overwrite)
    assert resp.HasField("denied_response") and not resp.HasField("ok_response")
    status = resp.denied_response.status.code
    assert status in GRPC_CODE and resp.status.code == GRPC_CODE[status], (status, resp.status.code)
    reason = resp.status.message
    assert reason, "a denial names its reason"
    assert meta["reason"].string_value == reason
    headers: dict[str, str] = {}
    for h in resp.denied_response.headers:
        assert h.header.key not in headers, f"header {h.header.key} twice"
        headers[h.header.key] = h.header.value
    params: dict[str, str] = {}
    if "www-authenticate" in headers:
        params = challenge_params(headers["www-authenticate"])
    if status in (400, 401):
        assert params.get("realm") == POLICY_DOC["realm"], headers
    error = params.get("error", "")
    acr_values = tuple(params["acr_values"].split(" ")) if "acr_values" in params else ()
    max_age = int(params["max_age"]) if "max_age" in params else None
    scope = tuple(params["scope"].split(" ")) if "scope" in params else ()
    if status == 400:
        outcome = "deny"
    elif status == 403:
        outcome = "deny"
    elif error == "insufficient_user_authentication":
        outcome = "step_up"
    else:
        outcome = "unauthenticated"
    assert meta["outcome"].string_value == outcome, (meta["outcome"].string_value, outcome)
    if is_grpc:
        assert headers.get("grpc-status") == str(resp.status.code), headers
    else:
        body = json.loads(resp.denied_response.body)
        assert body["reason"] == reason, body
        if outcome == "step_up":
            assert body["error"] == "insufficient_user_authentication", body
            assert body.get("acr_values", "") == params.get("acr_values", ""), (body, params)
            assert (body.get("max_age") is None) == (max_age is None), (body, params)
            if max_age is not None:
                assert int(body["max_age"]) == max_age, (body, params)
    return Observed(outcome, status, reason, error, acr_values, max_age, scope, params, {})


def is_grpc_caller(req: Any) -> bool:
    http = req.attributes.request.http
    values = [v for k, v in http.headers.items() if k.lower() == "content-type"]
    values += [h.raw_value.decode("utf-8", "replace") for h in http.header_map.headers if h.key.lower() == "content-type"]
    return len(values) == 1 and values[0].startswith("application/grpc")


def compare(ref: RefAnswer, got: Observed, context: str) -> None:
    """The handler's answer must be the reference's."""
    where = f"\n  reference: {ref}\n  sidecar:   {got}\n  request:   {context}"
    assert got.reason != "internal_error", "internal_error" + where
    assert (got.outcome, got.http_status) == (ref.outcome, ref.http_status), "outcome/status" + where
    if "*" not in ref.also:
        assert got.reason in ref.reasons(), "reason" + where
    expected_error = ref.error if got.reason == ref.reason else error_for(got.reason)
    if "*" in ref.also:
        expected_error = ref.error
    assert got.error == expected_error, "challenge error" + where
    if ref.acr_values is not None:
        assert got.acr_values == ref.acr_values, "acr_values" + where
    assert got.max_age == ref.max_age, "max_age" + where
    if ref.reason == "insufficient_scope" and got.reason == "insufficient_scope":
        assert set(got.scope) == set(ref.scope), "scope" + where
    if got.outcome == "allow":
        for name in IDENTITY_HEADERS:
            # README: identity headers are overwritten, or removed when not set on this answer.
            assert name in got.upstream or name in got.removed, f"{name} neither set nor removed" + where
            if name in got.upstream:
                assert got.overwrite[name], f"{name} not OVERWRITE_IF_EXISTS_OR_ADD" + where
    if got.outcome == "allow" and ref.subject:
        assert got.upstream.get("x-auth-subject") == ref.subject, "x-auth-subject" + where
        assert got.upstream.get("x-auth-issuer") == ISSUER, "x-auth-issuer" + where
    if got.outcome == "allow" and ref.assurance:
        assert got.upstream.get("x-auth-assurance") == ref.assurance, "x-auth-assurance" + where


def check_one(handler: Handler, reference: Reference, r: Req) -> None:
    req = to_check_request(r)
    before = handler.internal_errors()
    resp = handler.check(req)
    # The counter never moves (it stays 0 when every check passes; a per-check delta keeps one
    # internal error from failing every later check that shares the module's handler).
    assert handler.internal_errors() == before, f"internal error for {r}"
    got = observe(resp, is_grpc_caller(req))
    ref = reference.decide(req)
    if currently_in_test_context():
        event(f"{ref.outcome}: {ref.reason}")
    compare(ref, got, repr(r))


COMMON = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@COMMON
@given(r=requests())
def test_check_agrees_with_the_reference(handler: Handler, r: Req) -> None:
    """Well formed, never an internal error, and the reference's answer in every detail."""
    check_one(handler, REF, r)


@settings(COMMON, max_examples=100, phases=[Phase.generate])
@given(r=requests().map(lambda r: replace(r, path=r.path + draw_control(r.path))))
def test_check_agrees_with_the_reference_with_control_characters_in_the_path(handler: Handler, r: Req) -> None:
    """Same property, with a raw LF / CR / NUL / TAB at the end of the path (or of its query)."""
    check_one(handler, REF, r)


def draw_control(path: str) -> str:
    return "\n\r\x00\t"[len(path) % 4]


def _raw_token(label: str, **changes: str) -> Tok:
    """A token signed by the example key, with claims given as raw JSON texts."""
    claims = {
        "iss": J(ISSUER),
        "aud": J("bank-api"),
        "sub": J("alice"),
        "iat": str(NOW - 10),
        "exp": str(NOW + 600),
        "auth_time": str(NOW - 10),
        "roles": J(["teller"]),
        "scope": J("payments"),
        "acr": J(ACR_1FA),
        "amr": J(["pwd"]),
    }
    header = changes.pop("header", J({"alg": "RS256", "kid": KID}))
    signer = changes.pop("signer", "dev")
    claims.update(changes)
    return Tok(label, jws(header.encode(), obj_text(claims).encode(), signer))


def _case(path: str = "/bank.v1.Accounts/GetBalance", **kw: Any) -> Req:
    base: dict[str, Any] = {
        "method": "POST",
        "path": path,
        "content_type": "application/grpc" if path.startswith("/bank.") else "",
        "form": "headers",
        "auth": "bearer" if "token" in kw else "none",
        "token": None,
        "principal": "",
        "source": "127.0.0.1",
    }
    base.update(kw)
    return Req(**base)


# Hostile requests every run checks, whatever the generators draw (each is a spec line).
KNOWN_CASES = [
    ("repeated-authorization-on-a-public-route", _case("/healthz", method="GET", auth="twice", token=_raw_token("teller"))),
    ("comma-joined-authorization-on-an-unmatched-route", _case("/nothing", method="GET", auth="joined", token=_raw_token("teller"))),
    ("case-variant-authorization-keys", _case(auth="case-variant-keys", token=_raw_token("teller"))),
    ("method-star-is-a-tchar", _case("/v1/admin/users", method="*")),
    ("method-lower-case-get", _case("/v1/accounts/7/balance", method="get", token=_raw_token("teller"))),
    ("method-33-characters", _case("/v1/admin/users", method="X" * 33)),
    ("dot-segment-refused", _case("/v1/accounts/7/../7/balance", method="GET", token=_raw_token("teller"))),
    ("escaped-dot-segment-refused", _case("/v1/accounts/%2e%2E/admin", method="GET", token=_raw_token("teller"))),
    ("double-slash-refused", _case("//bank.v1.Accounts/GetBalance", token=_raw_token("teller"))),
    ("escaped-unreserved-decoded", _case("/v1/%61ccounts/7/b%61lance", method="GET", token=_raw_token("teller"))),
    ("escaped-dot-in-grpc-service", _case("/bank%2Ev1.Accounts/GetBalance", token=_raw_token("teller"))),
    ("query-with-brackets-and-pipes", _case("/v1/accounts/7/balance?a=[1]|{x}^", method="GET", token=_raw_token("teller"))),
    ("nul-in-a-header", _case("/healthz", method="GET", extra={"x-note": "a\x00b"})),
    ("sub-lone-surrogate", _case(token=_raw_token("sub=\\ud800", sub='"\\ud800"'))),
    ("roles-one-string-teller-admin", _case("/bank.v1.Admin/List", token=_raw_token("roles='teller admin'", roles=J("teller admin"), acr=J(ACR_PHRH)))),
    ("exp-10**400", _case(token=_raw_token("exp=10**400", exp=str(10**400)))),
    ("iat-10**400", _case(token=_raw_token("iat=10**400", iat=str(10**400)))),
    ("auth_time-10**400", _case(token=_raw_token("auth_time=10**400", auth_time=str(10**400)))),
    ("iss-list", _case(token=_raw_token("iss=[...]", iss=J([ISSUER])))),
    ("aud-object", _case(token=_raw_token("aud={...}", aud=J({"aud": "bank-api"})))),
    ("alg-list", _case(token=_raw_token("alg=[RS256]", header=J({"alg": ["RS256"], "kid": KID})))),
    ("kid-number", _case(token=_raw_token("kid=5", header=J({"alg": "RS256", "kid": 5})))),
    ("embedded-jwk-ignored", _case(token=_raw_token("jwk", header=J({"alg": "RS256", "kid": KID, "jwk": OTHER_PUBLIC_JWK}), signer="other"))),
    ("deeply-nested-claim", _case(token=_raw_token("x=[[[...]]]", x=DEEP_LIST))),
    ("jwt-authn-wrong-audience", _case(jwt_authn=("jwt_payload", {"iss": ISSUER, "aud": "other-api", "sub": "c", "exp": NOW + 600, "roles": ["teller"], "acr": ACR_1FA}))),
    ("jwt-authn-expired", _case(jwt_authn=("jwt_payload", {"iss": ISSUER, "aud": "bank-api", "sub": "c", "exp": NOW - 120, "roles": ["teller"], "acr": ACR_1FA}))),
    ("workload-without-user-token", _case(principal=LEDGER)),
    ("workload-regex-lookalike", _case(principal="spiffe://cluster.local/ns/bank/sa/(ledger)")),
    ("xfcc-is-not-a-principal", _case(extra={"x-forwarded-client-cert": f"URI={LEDGER}"})),
    ("untrusted-source-raises", _case("/bank.v1.Payments/Transfer", token=_raw_token("phr", acr=J(ACR_PHR)), source="203.0.113.9")),
    ("ipv4-mapped-trusted-source", _case("/bank.v1.Payments/Transfer", token=_raw_token("phr", acr=J(ACR_PHR)), source="::ffff:10.1.2.3")),
    ("context-extension-raises", _case(token=_raw_token("teller"), extensions={"sensitivity": "critical"})),
]


@pytest.mark.parametrize("r", [r for _, r in KNOWN_CASES], ids=[name for name, _ in KNOWN_CASES])
def test_known_hostile_cases_agree_with_the_reference(handler: Handler, r: Req) -> None:
    check_one(handler, REF, r)


# --------------------------------------------------------------------------------------------
# A variant of the example policy: more kinds of rules, the other risk conditions
# --------------------------------------------------------------------------------------------


def variant_doc() -> dict[str, Any]:
    doc = copy.deepcopy(POLICY_DOC)
    doc["issuers"][0]["jwks_file"] = str(EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json")
    doc["permissions"] += [
        # An `anyone` grant on a non-public operation: a workload without a user token gets
        # missing_credential there (spec-issue8 "Workloads").
        {"id": "anyone-history", "match": ["GET /v1/accounts/*/history/**"], "allow": {"anyone": True}},
        {"id": "batch", "match": ["/bank.v1.Accounts/*"], "allow": {"principals": ["spiffe://cluster.local/ns/bank/sa/batch-*"]}},
        {"id": "bob-admin-users", "match": ["GET /v1/admin/users"], "allow": {"users": ["bob"]}},
        {"id": "auditors", "match": ["GET /v1/admin/**"], "allow": {"roles": ["auditor"], "scopes": ["audit"]}},
    ]
    # Literal reserved characters in patterns: `%3A` / `%40` in a request are the same operation.
    doc["sensitivity"]["rules"] += [
        {"id": "freeze", "match": ["POST /v1/accounts/7:freeze"], "level": "high"},
        {"id": "me", "match": ["GET /v1/users/@me"], "level": "low"},
    ]
    doc["permissions"] += [
        {"id": "freeze", "match": ["POST /v1/accounts/7:freeze"], "allow": {"roles": ["teller"]}},
        {"id": "me", "match": ["GET /v1/users/@me"], "allow": {"authenticated": True}},
    ]
    doc["risk"] += [
        {"id": "unknown-device", "when": {"device_unknown": {"header": "x-device-id", "known": ["laptop-7f3a"]}}, "raise": 1},
        # NOW is Friday 2027-01-15 09:00 in Berlin: outside 10:00-18:00, so this one fires.
        {
            "id": "off-hours",
            "when": {"outside_hours": {"timezone": "Europe/Berlin", "days": ["mon", "tue", "wed", "thu", "fri"], "from": "10:00", "to": "18:00"}},
            "max_age": "20m",
        },
    ]
    return doc


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Handler, Reference]]:
    doc = variant_doc()
    path = tmp_path_factory.mktemp("variant") / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    h = Handler(path)
    yield h, Reference(doc, JWKS, NOW)
    h.close()


@settings(COMMON, max_examples=300)
@given(r=requests(principals=(*PRINCIPALS, BATCH + "7", BATCH, BATCH[:-1], BATCH.upper() + "7")))
def test_check_agrees_with_the_reference_on_a_variant_policy(variant: tuple[Handler, Reference], r: Req) -> None:
    """The same property on a policy with more kinds of grants and all three risk conditions."""
    handler, reference = variant
    check_one(handler, reference, r)


# --------------------------------------------------------------------------------------------
# The reference is not vacuous: hand-checked answers
# --------------------------------------------------------------------------------------------


def signed(header: dict[str, Any] | None = None, signer: str = "dev", drop: tuple[str, ...] = (), **claims: Any) -> str:
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "bank-api",
        "sub": "alice",
        "iat": NOW - 10,
        "exp": NOW + 600,
        "auth_time": NOW - 10,
        "roles": ["teller"],
        "scope": "payments",
        "acr": ACR_1FA,
        "amr": ["pwd"],
    }
    body.update(claims)
    for k in drop:
        body.pop(k)
    hdr = header if header is not None else {"alg": "RS256", "kid": KID, "typ": "JWT"}
    return jws(json.dumps(hdr).encode(), json.dumps(body).encode(), signer)


def ask(reference: Reference = REF, path: str = "/bank.v1.Accounts/GetBalance", **kw: Any) -> tuple[Any, ...]:
    a = reference.decide(check_request(path, **kw))
    return (a.outcome, a.http_status, a.reason, a.error, a.acr_values, a.max_age)


def test_reference_hand_checked_answers() -> None:
    """One case per outcome and most reason codes, each worked out by hand from the README."""
    teller = signed()
    # allow
    assert ask(path="/healthz", method="GET", grpc=False) == ("allow", 200, "public", "", (), None)
    assert ask(path="/healthz?x=[1]", method="GET", grpc=False, token="garbage") == ("allow", 200, "public", "", (), None)
    assert ask(token=teller) == ("allow", 200, "allowed", "", (), None)
    a = REF.decide(check_request("/v1/accounts/7/balance", method="GET", token=teller, source="10.1.2.3"))
    assert (a.reason, a.subject, a.assurance) == ("allowed", "alice", "aal1")
    assert ask(principal=LEDGER, source="") == ("allow", 200, "workload_granted", "", (), None)
    assert ask(path="/v1/%61dmin/users/", method="GET", grpc=False, token=signed(roles=["admin"], acr=ACR_PHRH))[2] == "allowed"
    # Escaped ':' and '@' are the same characters; '%2E' in a gRPC service name too.
    assert ask(path="/bank%2Ev1.Accounts/GetBalance", token=teller)[2] == "allowed"
    # step up: strength (README example), freshness, both (untrusted network: aal3 and 30 min)
    transfer = "/bank.v1.Payments/Transfer"
    assert ask(path=transfer, token=teller) == (
        "step_up", 401, "acr_too_low", "insufficient_user_authentication", ("phr", "phrh"), None,
    )
    stale = signed(acr=ACR_PHR, amr=["hwk", "pin"], auth_time=NOW - 7200)
    assert ask(path=transfer, token=stale) == ("step_up", 401, "auth_too_old", "insufficient_user_authentication", (), 3600)
    a = REF.decide(check_request(transfer, token=signed(acr=ACR_PHR, auth_time=NOW - 3000), source="203.0.113.9"))
    assert (a.reason, a.also, a.acr_values, a.max_age) == ("acr_too_low", ("auth_too_old",), ("phrh",), 1800)
    assert ask(path=transfer, token=signed(acr=ACR_PHR, auth_time=NOW - 3000))[2] == "allowed"
    # amr derivation: pwd+otp (two classes) is aal2, no more; unmapped acr falls back to amr
    assert ask(path="/bank.v1.Accounts/List", token=signed(acr="gold", amr=["pwd", "otp"]))[2] == "allowed"
    assert ask(path="/bank.v1.Accounts/List", token=signed(drop=("acr",), amr=["pwd"]))[4] == (
        "urn:okta:loa:2fa:any", "phr", "phrh",
    )
    # context extension raises (critical: aal3 within 15 min), never lowers
    a = REF.decide(check_request(token=teller, context_extensions={"sensitivity": "critical"}))
    assert (a.reason, a.acr_values, a.max_age) == ("acr_too_low", ("phrh",), None)
    assert ask(path="/bank.v1.Admin/List", token=signed(roles=["admin"], acr=ACR_PHRH), context_extensions={"sensitivity": "public"})[2] == "allowed"
    assert ask(path="/bank.v1.Admin/List", context_extensions={"sensitivity": "public"})[2] == "missing_credential"
    # unauthenticated
    assert ask() == ("unauthenticated", 401, "missing_credential", "", (), None)
    assert ask(headers={"authorization": "Basic YTpi"}) == ("unauthenticated", 401, "missing_credential", "", (), None)
    assert ask(path=transfer, principal=LEDGER) == ("unauthenticated", 401, "missing_credential", "", (), None)
    bad = {
        "token_expired": signed(exp=NOW - 61),
        "token_not_yet_valid": signed(nbf=NOW + 61),
        "token_issued_in_future": signed(iat=NOW + 61),
        "bad_signature": signed(signer="other"),
        "unknown_key": signed(header={"alg": "RS256", "kid": "nope"}),
        "unknown_issuer": signed(iss="https://evil.example"),
        "wrong_audience": signed(aud="other-api"),
        "disallowed_algorithm": signed(header={"alg": "none"}, signer="none"),
        "malformed_token": "a.b.c",
        "invalid_claim": signed(roles=5),
    }
    for reason, token in bad.items():
        assert ask(token=token, principal=LEDGER) == ("unauthenticated", 401, reason, "invalid_token", (), None), reason
    assert ask(token=signed(exp=NOW - 59))[2] == "allowed"  # inside the 60 s skew
    assert ask(token=signed(auth_time=NOW + 600))[2] == "invalid_claim"
    assert ask(token=jws(b'{"alg":"RS256","kid":"dev-2026-1"}', obj_text({"iss": J(ISSUER), "aud": J("bank-api"), "sub": J("a"), "exp": str(10**400)}).encode(), "dev"))[2] == "invalid_claim"
    deep = obj_text({"iss": J(ISSUER), "aud": J("bank-api"), "sub": J("a"), "exp": str(NOW + 600), "x": DEEP_LIST})
    assert ask(token=jws(b'{"alg":"RS256","kid":"dev-2026-1"}', deep.encode(), "dev"))[2] == "malformed_token"
    assert REF.decide(check_request(token=signed(iss=[ISSUER]))).reasons() == ("malformed_token", "invalid_claim", "unknown_issuer")
    # deny 403
    assert ask(path="/v1/nothing", method="GET", grpc=False) == ("deny", 403, "no_matching_rule", "", (), None)
    assert ask(path="/healthz", method="get", grpc=False) == ("deny", 400, "invalid_method", "invalid_request", (), None)
    assert ask(path=transfer, token=signed(roles=["customer"])) == ("deny", 403, "permission_denied", "", (), None)
    assert ask(path="/bank.v1.Admin/List", token=signed(roles="teller admin", acr=ACR_PHRH))[2] == "permission_denied"
    a = REF.decide(check_request(transfer, token=signed(scope="read")))
    assert (a.outcome, a.http_status, a.reason, a.error, a.scope) == ("deny", 403, "insufficient_scope", "insufficient_scope", ("payments",))
    assert ask(path="/bank.v1.Admin/List", token=teller, context_extensions={"sensitivity": "bogus"})[:3] == ("deny", 403, "no_matching_rule")
    # deny 400
    for path in ["/v1/accounts/../admin/users", "//healthz", "/healthz/.", "/a%2Fb", "/%2e%2e/healthz", "/v1;x", "/healthz?a b", "/v1/%c0%ae", "/a%zz"]:
        assert ask(path=path, method="GET", grpc=False)[:4] == ("deny", 400, "invalid_path", "invalid_request"), path
    assert ask(path="/healthz", method="G T", grpc=False)[2] == "invalid_method"
    assert ask(path="/healthz", method="X" * 33, grpc=False)[2] == "invalid_method"
    assert ask(path="/healthz", method="GET", grpc=False, headers={"x-note": "a\x00b"})[2] == "invalid_header"
    assert ask(path="/healthz", method="GET", grpc=False, header_map=[("x-raw", b"\xff")])[2] == "invalid_header"
    twice = [("authorization", f"Bearer {teller}".encode())] * 2
    assert ask(path="/healthz", method="GET", grpc=False, header_map=twice)[2] == "ambiguous_credentials"
    assert ask(headers={"authorization": "Bearer a,Bearer b"})[2] == "ambiguous_credentials"
    # jwt_authn metadata: the same claim checks, no signature
    meta = {"iss": ISSUER, "aud": "bank-api", "sub": "carol", "exp": NOW + 600.0, "roles": ["teller"], "acr": ACR_1FA, "auth_time": NOW - 10.0}
    assert ask(jwt_payload=meta, token="garbage")[2] == "allowed"
    assert ask(jwt_payload={**meta, "aud": "other-api"})[2] == "wrong_audience"
    assert ask(jwt_payload={**meta, "exp": NOW - 120.0})[2] == "token_expired"
    assert ask(jwt_payload={**meta, "iss": "https://evil.example"})[2] == "unknown_issuer"


def test_reference_on_hand_made_policy_variants() -> None:
    """Risk rules of the three kinds, required_amr, principal prefixes, `users`, `anyone`."""
    doc = variant_doc()
    doc["risk"][-1]["raise"] = 2  # off-hours raises by 2, the unknown device by 1
    doc["sensitivity"]["levels"]["vault"] = {"min_assurance": "aal2", "required_amr": ["hwk"]}
    doc["issuers"][0]["acr"]["aal3"]["implies_amr"] = {"phrh": ["hwk"]}  # else refused at load
    doc["sensitivity"]["rules"].append({"id": "vault", "match": ["/bank.v1.Vault/*"], "level": "vault"})
    doc["permissions"].append({"id": "vault", "match": ["/bank.v1.Vault/*"], "allow": {"authenticated": True}})
    ref = Reference(doc, JWKS, NOW)
    good_device = {"x-device-id": "laptop-7f3a"}
    # off-hours fires (raise 2, max_age 20 min): a balance (aal1) now needs aal2_phr.
    a = ref.decide(check_request(token=signed(acr=ACR_2FA), headers=good_device))
    assert (a.reason, a.acr_values, a.max_age) == ("acr_too_low", ("phr", "phrh"), None)
    # ... and an unknown device too: max raise is 2, not 3.
    a = ref.decide(check_request(token=signed(acr=ACR_PHR, auth_time=NOW - 1300)))
    assert (a.reason, a.acr_values, a.max_age) == ("auth_too_old", (), 1200)
    assert ref.decide(check_request(token=signed(acr=ACR_PHR))).reason == "allowed"
    # required_amr
    # (off-hours raises the vault's aal2 to aal3 here; only phrh is askable, and it implies hwk)
    a = ref.decide(check_request("/bank.v1.Vault/List", token=signed(acr=ACR_PHR, amr=["hwk"])))
    assert (a.outcome, a.reason, a.acr_values) == ("step_up", "acr_too_low", ("phrh",))
    assert ref.decide(check_request("/bank.v1.Vault/List", token=signed(acr=ACR_PHRH, amr="pwd"))).reason == "allowed"
    assert ref.decide(check_request("/bank.v1.Vault/List", token=signed(acr=ACR_PHRH, amr="hwk"))).reason == "allowed"
    # principals: prefix, never a regex, never from x-forwarded-client-cert
    assert ref.decide(check_request(principal="spiffe://cluster.local/ns/bank/sa/batch-9")).reason == "workload_granted"
    assert ref.decide(check_request(principal="spiffe://cluster.local/ns/bank/sa/batch")).reason == "missing_credential"
    assert ref.decide(check_request(headers={"x-forwarded-client-cert": f"URI={LEDGER}"})).reason == "missing_credential"
    # `anyone` on a non-public operation: a workload still needs a user token
    history = "/v1/accounts/7/history/2024"
    assert ref.decide(check_request(history, method="GET", grpc=False, principal=LEDGER)).reason == "missing_credential"
    assert ref.decide(check_request(history, method="GET", grpc=False, token=signed(roles=[], acr=ACR_PHRH), headers=good_device)).reason == "allowed"
    # `users`, and the scope-only shortfall
    bob = signed(sub="bob", roles=[], acr=ACR_PHRH)
    assert ref.decide(check_request("/v1/admin/users", method="GET", grpc=False, token=bob, headers=good_device)).reason == "allowed"
    a = ref.decide(check_request("/v1/admin/users/3", method="GET", grpc=False, token=signed(roles=["auditor"], acr=ACR_PHRH)))
    assert (a.reason, a.scope) == ("insufficient_scope", ("audit",))
    # outside_hours not firing inside the window, and across midnight
    for window, fires in [(("07:00", "20:00"), False), (("22:00", "10:00"), False), (("22:00", "08:00"), True)]:
        doc2 = copy.deepcopy(doc)
        doc2["risk"] = [{"id": "h", "when": {"outside_hours": {"timezone": "Europe/Berlin", "days": ["fri"], "from": window[0], "to": window[1]}}}]
        a = Reference(doc2, JWKS, NOW).decide(check_request(token=signed()))
        assert a.reason == ("acr_too_low" if fires else "allowed"), window


def test_reference_path_canonicalisation() -> None:
    c = REF.canonical_path
    assert c("/v1/admin/users/") == "/v1/admin/users/"  # kept: decided under both readings
    assert c("/") == "/"
    assert c("/a%3Ab") == c("/a:b") == "/a:b"
    assert c("/%61dmin") == "/admin"
    assert c("/caf%c3%a9") == c("/caf%C3%A9") == "/caf%C3%A9"
    assert c("/a%20b") == "/a%20b"
    assert c("/x?q=[|]{}^\u00e9#f") == "/x"
    for bad in ["//", "/a//b", "/.", "/a/..", "/%2E%2e/x", "/.%2E", "/a%2fb", "/a%5Cb", "/a%00", "/a%25", "/a%3B", "/a;b", "/a b",
                "/\u00e9", "/a%ff", "/a%c0%ae", "/a%", "/a%4", "x", "", "/x?a\x00", "/x?a b", "/" + "a" * 8192]:
        assert c(bad) is None, bad
    assert c("/" + "a" * 8191) is not None
