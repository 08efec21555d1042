"""The structured half of the fuzzer: CheckRequests built, and mutated, field by field.

Random bytes rarely parse as a CheckRequest, and a parsed one rarely carries a token that
verifies. So this module builds requests the way Envoy sends them, from the operations of the
fuzzed policies bent by hostile fragments (the spec of issue 8): methods, raw paths, both header
forms (`headers`, `header_map` with raw bytes), `Authorization` values around bearer tokens whose
JOSE header and payload are fuzzed JSON texts (NaN, 1e400, deep nesting, wrong types...), signed
with the example development key (so that they verify), another key, HMAC, `none`, or garbage;
mTLS principals, source addresses, route context extensions, and Envoy jwt_authn metadata.

Everything is driven by one `random.Random`: atheris' custom mutator passes its seed, the
regression test a fixed one. Nothing here imports atheris.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
from functools import cache
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf import struct_pb2

from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2
from tests.helpers import ACR_1FA, ACR_2FA, ACR_PHR, ACR_PHRH, ISSUER, NOW, PRIVATE_JWK

SECOND_ISSUER = "https://login.partner.test/tenant-1"  # the variant policy's second issuer
KID = PRIVATE_JWK["kid"]
JWT_AUTHN = "envoy.filters.http.jwt_authn"
LEDGER = "spiffe://cluster.local/ns/bank/sa/ledger"
BATCH = "spiffe://cluster.local/ns/bank/sa/batch-"
ACR_MFA = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"

# ------------------------------------------------------------------------------------------------
# Vocabularies (from examples/policy.yaml and the variant policy in harness.py)
# ------------------------------------------------------------------------------------------------

OPERATIONS = (
    ("POST", "/bank.v1.Accounts/GetBalance"),
    ("POST", "/bank.v1.Accounts/ListAccounts"),
    ("POST", "/bank.v1.Payments/Transfer"),
    ("POST", "/bank.v1.Payments/Refund"),
    ("POST", "/bank.v1.Admin/SetPermissions"),
    ("POST", "/bank.v1.Unknown/Call"),
    ("GET", "/healthz"),
    ("GET", "/v1/accounts/7/balance"),
    ("GET", "/v1/accounts/7"),
    ("GET", "/v1/accounts/7/history/2024"),
    ("GET", "/v1/accounts/7/statements"),
    ("POST", "/v1/transfers"),
    ("GET", "/v1/admin/users"),
    ("DELETE", "/v1/admin/users/9"),
    ("POST", "/v1/accounts/7:freeze"),
    ("GET", "/v1/users/@me"),
    ("GET", "/v1/partner/report"),
    ("GET", "/v1/ops/status"),
    ("GET", "/"),
    ("GET", "/docs/secret"),
)
METHODS = (
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    "get", "Get", "post", "", "*", "G T", "GET ", " GET", "GET\x00", "G\u00c9T", "X" * 32, "X" * 33,
    "M-SEARCH", "!#$%&'*+-.^_`|~", "(", "GET\n", "\u0130", "BREW",
)  # fmt: skip
PATH_FRAGMENTS = (
    "/..", "/.", "..", ".", "/%2e%2e", "/%2E.", "/.%2e", "%2e", "%2F", "%2f", "%5C", "%5c", "\\", "//",
    "/", ";", ";jsessionid=1", "%3B", "%3b", "%00", "\x00", "%25", "%252e", "%61", "%41", "%3A", "%3a",
    "%40", "%21", "%2A", "%7E", "%C3%A9", "%c3%a9", "%c3", "%ff", "%e2%80%ae", "%c0%ae", "%u002e", "%",
    "%G1", "%2", " ", "%20", "\u00e9", "\u202e", "\t", "\n", "\r", "\x7f", "[", "]", "|", "{", "}",
    "^", '"', "<", ">", "`", "*", "**", "~", "'", "(", ")", "+", ",", "=", "$", "&", "!", ":", "@",
    "-", "_", "#", "?", "%23", "%3F", "%2e%2e%2f", "\ufffd", "\U0001f600",
)  # fmt: skip
QUERIES = (
    "?", "?a=b", "?a=%ZZ", "?x=\x00", "?[]|{}^\"<>", "?\u00e9", "#frag", "#", "?a#b", "?\x7f", "?a b",
    "?%2e%2e/admin", "?/../admin", "?;x", "#/../admin", "?\t", "?a=\r\n", "?_method=DELETE",
    "?a=1&_method=put", "#_method=GET", "?_method",
)  # fmt: skip
CONTENT_TYPES = (
    "application/grpc", "application/grpc+proto", "application/grpc-web", "application/json",
    "text/plain", "", "Application/grpc", " application/grpc", "application/grpcx", "application/grp",
)  # fmt: skip
SOURCES = (
    "127.0.0.1", "10.1.2.3", "10.255.255.255", "203.0.113.9", "::1", "::ffff:10.0.0.1", "::ffff:203.0.113.9",
    "", "localhost", "10.0.0.1%eth0", "fe80::1%eth0", "256.1.1.1", "10.0.0.1 ", "1" * 70, "0.0.0.0",
    "10.0.0", "0x0a000001", "010.0.0.1", "::", "2001:db8::1", "::ffff:127.0.0.1", "127.1",
)  # fmt: skip
PRINCIPALS = (
    "", LEDGER, LEDGER + "x", LEDGER.upper(), LEDGER + "/", BATCH + "7", BATCH, BATCH[:-1], BATCH.upper() + "7",
    "spiffe://cluster.local/ns/bank/sa/led.er", "*", LEDGER + "\x00", " " + LEDGER, "spiffe://other/ledger",
)  # fmt: skip
SENSITIVITIES = ("public", "low", "personal", "high", "critical", "step_hwk", "unknown", "", "PUBLIC", "low ")
HEADER_NAMES = (
    "x-device-id", "x-forwarded-for", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
    "x-b3-sampled", "cookie", "x-auth-subject", "x-auth-issuer", "x-auth-assurance", "x-auth-decision-id",
    "X-Auth-Subject", ":path", ":method", ":authority", "host", "user-agent", "x-note", "", "x y",
    "x\u00e9", "x\x00", "Content-Type", "AUTHORIZATION", "Authorization", "te", "grpc-timeout",
    "x-http-method-override", "X-HTTP-Method-Override", "x-http-method", "x-method-override",
)  # fmt: skip
DEVICE_IDS = ("laptop-7f3a", "phone-1", "", " laptop-7f3a ", "LAPTOP-7F3A", "laptop-7f3a,phone-1")
TRACEPARENTS = (
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "00-gggggggggggggggggggggggggggggggg-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
    "", "-", "00", "\u00e9" * 55,
)
B3_VALUES = ("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1", "-", "0", "d", "x-y-z-w", "a" * 32)
PERSONAS = (
    {"sub": "alice", "roles": ["teller"], "scope": "payments"},
    {"sub": "root", "roles": ["admin"]},
    {"sub": "carol", "roles": ["customer"], "groups": ["ops"]},
    {"sub": "dave", "roles": ["auditor"], "scope": "audit"},
    {"sub": "bob", "roles": []},
    {"sub": "eve"},
)
ROLES = ("teller", "admin", "customer", "auditor", "Admin", "", "teller ", "ops")
ACRS = (ACR_1FA, ACR_2FA, ACR_MFA, ACR_PHR, ACR_PHRH, "urn:okta:loa:1fa:pwd", "gold", "PHR", "phr ", "")
AMRS = (
    "pwd", "pin", "kba", "hwk", "swk", "otp", "sms", "tel", "sc", "pop", "fpt", "face", "iris", "retina",
    "vbm", "bio", "user", "mfa", "geo", "rba", "mca", "wia", "PWD", "",
)  # fmt: skip
AUDIENCES = ("bank-api", "other-api", "Bank-Api", "", "bank-api ")
SUBJECTS = ("alice", "bob", "root", "", " ", "al\u00efce", "admin\n", "a" * 300, "x\"y", "\u202e")
ISSUERS = (ISSUER, SECOND_ISSUER, "https://evil.example", ISSUER + "/", ISSUER.upper(), "")
ALGS = ("RS256", "RS384", "RS512", "PS256", "ES256", "EdDSA", "HS256", "none", "None", "rs256", "")
HEADER_EXTRAS = (
    ("crit", ["exp"]), ("crit", []), ("crit", "b64"), ("b64", False), ("jku", "https://evil.example/jwks"),
    ("x5u", "https://evil.example/x5"), ("jwk", {"kty": "RSA", "n": "AQAB", "e": "AQAB"}), ("zip", "DEF"),
    ("cty", "JWT"), ("typ", "at+jwt"), ("typ", 1), ("x5c", ["MIIB"]), ("kid", "../../etc/passwd"),
)  # fmt: skip


class Raw:
    """A JSON value written as this exact text (NaN, 1e400, a lone surrogate escape, 10k levels)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r})"


def chance(r: random.Random, p: float) -> bool:
    return r.random() < p


def pick(r: random.Random, seq: Any) -> Any:
    return seq[r.randrange(len(seq))]


def to_json(v: Any) -> str:
    """JSON text of a value that may hold `Raw` parts (and non-string keys are stringified)."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(to_json(x) for x in v) + "]"
    return json.dumps(v)


# ------------------------------------------------------------------------------------------------
# Claim values
# ------------------------------------------------------------------------------------------------


def deep(depth: int, leaf: str = "1") -> Raw:
    return Raw("[" * depth + leaf + "]" * depth)


def time_value(r: random.Random, base: float) -> Any:
    """A value for exp / nbf / iat / auth_time: mostly a sensible number around `base`."""
    k = r.randrange(20)
    if k < 10:
        return int(base)
    return pick(
        r,
        (
            int(NOW) - 100_000, int(NOW) + 100_000, float(base) + 0.5, str(int(base)), True, False, None,
            [int(base)], {"t": 1}, Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400"),
            Raw("9" * 400), 2**53, 2**53 - 1, -(2**53) + 1, 2**63, 1e308, Raw("1e-400"), Raw("1800000000.0e0"),
            0, -1, Raw("1E9"),
        ),
    )  # fmt: skip


def strings_value(r: random.Random, vocab: Any) -> Any:
    k = r.randrange(12)
    if k < 6:
        return [pick(r, vocab) for _ in range(r.randrange(4))]
    if k < 9:
        return pick(r, vocab)
    return pick(r, ([1], {}, {"a": "b"}, [None], [[pick(r, vocab)]], 7, True, None, " ".join(vocab[:3]), [""]))


def claim_value(r: random.Random, name: str) -> Any:
    """A (usually plausible, sometimes hostile) value for one claim."""
    if name in ("exp",):
        return time_value(r, NOW + pick(r, (600, 30, -30, -61, -3600, 86400 * 365)))
    if name in ("nbf", "iat"):
        return time_value(r, NOW + pick(r, (-10, 0, 30, 61, 3600)))
    if name == "auth_time":
        return time_value(r, NOW - pick(r, (10, 600, 1800, 3660, 7200, 50_000, -30, -120)))
    if name in ("roles", "groups"):
        return strings_value(r, ROLES)
    if name == "amr":
        return strings_value(r, AMRS)
    if name in ("acr", "acrs"):
        return strings_value(r, ACRS) if chance(r, 0.3) else pick(r, ACRS)
    if name == "scope":
        return pick(r, ("payments", "payments audit", ["payments"], ["audit"], "audit", "", " payments ", ["a b"], 1))
    if name in ("sub", "uid"):
        return pick(r, (*SUBJECTS, 1, None, ["alice"], {"id": "alice"}, True))
    if name == "iss":
        return pick(r, (*ISSUERS, ["https://idp.example.test"], 1, None, {"iss": ISSUER}))
    if name == "aud":
        return pick(r, (*AUDIENCES, ["other", "bank-api"], [], 1, {}, [1], None, ["bank-api", 1], "partner-api"))
    if name == "realm_access":
        return pick(r, ({"roles": strings_value(r, ROLES)}, {"roles": "admin"}, [], "admin", None))
    return pick(r, (1, "x", None, [], {}, deep(r.randrange(1, 30)), Raw("1e400"), "\u0000"))


CLAIM_NAMES = (
    "iss", "aud", "sub", "exp", "nbf", "iat", "auth_time", "roles", "groups", "scope", "acr", "amr",
    "uid", "acrs", "realm_access", "realm_access.roles", "jti", "azp",
)  # fmt: skip


def base_claims(r: random.Random, issuer: str) -> dict[str, Any]:
    persona = pick(r, PERSONAS)
    claims: dict[str, Any] = {"iss": issuer, "aud": "bank-api" if issuer == ISSUER else "partner-api"}
    if issuer == SECOND_ISSUER:
        claims["uid"] = persona["sub"]
        claims["realm_access"] = {"roles": list(persona.get("roles", []))}
        claims["acrs"] = [pick(r, ("silver", "gold", "platinum", "bronze"))]
    else:
        claims.update(persona)
        claims["acr"] = pick(r, ACRS[:6])
    claims["exp"] = int(NOW) + 600
    claims["iat"] = int(NOW) - 10
    if chance(r, 0.85):
        claims["auth_time"] = int(NOW) - pick(r, (10, 300, 1700, 3000, 7200, 40_000))
    claims["amr"] = [pick(r, AMRS[:17]) for _ in range(r.randrange(3))]
    return claims


def perturb_claims(r: random.Random, claims: dict[str, Any], n: int) -> None:
    for _ in range(n):
        name = pick(r, CLAIM_NAMES)
        if chance(r, 0.25):
            claims.pop(name, None)
        else:
            claims[name] = claim_value(r, name)
    if chance(r, 0.03):
        claims["pad"] = "x" * pick(r, (7000, 9000, 20000))


# ------------------------------------------------------------------------------------------------
# Tokens
# ------------------------------------------------------------------------------------------------


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_decode(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None


def _b64_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


@cache
def dev_key() -> rsa.RSAPrivateKey:
    j = PRIVATE_JWK
    public = rsa.RSAPublicNumbers(_b64_int(j["e"]), _b64_int(j["n"]))
    return rsa.RSAPrivateNumbers(
        p=_b64_int(j["p"]),
        q=_b64_int(j["q"]),
        d=_b64_int(j["d"]),
        dmp1=_b64_int(j["dp"]),
        dmq1=_b64_int(j["dq"]),
        iqmp=_b64_int(j["qi"]),
        public_numbers=public,
    ).private_key()


@cache
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


_SIGNATURES: dict[tuple[str, str], bytes] = {}
SIGNERS = ("dev", "dev", "dev", "dev", "dev", "dev", "dev", "dev", "other", "none", "hs256", "garbage", "cut")


def signature(signing_input: str, signer: str, r: random.Random | None = None) -> str:
    """The third part of a compact JWS over `signing_input` (the first two parts, as text)."""
    if signer == "none":
        return ""
    if signer == "garbage":
        rr = r or random.Random(0)
        return b64u(bytes(rr.randrange(256) for _ in range(rr.choice((1, 16, 255, 256, 257)))))
    if signer == "hs256":
        return b64u(hmac.new(b"secret", signing_input.encode(), hashlib.sha256).digest())
    key = (signing_input, "other" if signer == "other" else "dev")
    sig = _SIGNATURES.get(key)
    if sig is None:
        private = other_key() if signer == "other" else dev_key()
        sig = private.sign(signing_input.encode("utf-8", "surrogatepass"), padding.PKCS1v15(), hashes.SHA256())
        if len(_SIGNATURES) > 20_000:
            _SIGNATURES.clear()
        _SIGNATURES[key] = sig
    text = b64u(sig)
    return text[: len(text) // 2] if signer == "cut" else text


def encode_segment(r: random.Random, data: bytes) -> str:
    """base64url without padding, usually; sometimes a spelling a strict decoder refuses."""
    if not chance(r, 0.06):
        return b64u(data)
    std = base64.b64encode(data).decode()
    return pick(r, (std, std.rstrip("="), b64u(data) + "=", b64u(data) + "==", " " + b64u(data), b64u(data) + "*"))


def header_text(r: random.Random) -> str:
    header: dict[str, Any] = {"alg": "RS256", "kid": KID, "typ": "JWT"}
    if chance(r, 0.2):
        for _ in range(1 + r.randrange(2)):
            k = r.randrange(4)
            if k == 0:
                header["alg"] = pick(r, (*ALGS, None, 1, ["RS256"]))
            elif k == 1:
                if chance(r, 0.3):
                    header.pop("kid", None)
                else:
                    header["kid"] = pick(r, ("other-kid", "", None, 1, [KID], KID.upper(), KID + " "))
            else:
                name, value = pick(r, HEADER_EXTRAS)
                header[name] = value
    return odd_json(r, header, 0.04)


def odd_json(r: random.Random, obj: dict[str, Any], p: float) -> str:
    """The JSON text of `obj`, or with probability p a text that is not quite one JSON object."""
    text = to_json(obj)
    if not chance(r, p):
        return text
    k = r.randrange(12)
    if k == 0:
        return text[: r.randrange(len(text))]
    if k == 1:
        return pick(r, ("[]", "null", '"x"', "1", "true", "", "[1,2]", "{}"))
    if k == 2:
        return "\ufeff" + text
    if k == 3:
        return text + pick(r, (" ", "x", "}", "\x00", "\n"))
    if k == 4:
        return text[:-1] + ',"iss":' + pick(r, ('"https://evil.example"', "1", "null", "[]")) + "}"  # duplicate key
    if k == 5:
        return text[:-1] + ',"x":' + deep(pick(r, (50, 900, 1000, 1100, 5000))).text + "}"
    if k == 6:
        return text[:-1] + ',"x":"\\ud800"}'
    if k == 7:
        return text[:-1] + ',"x":"\\u0000"}'
    if k == 8:
        return "{" + '"a":{' * pick(r, (200, 1000, 3000)) + "}" * pick(r, (200, 1000, 3000)) + "}"
    if k == 9:
        return text.replace('"', "'", 2)
    if k == 10:
        return text.replace(":", ": ", 3) + "\t"
    return text[:-1] + ',"n":' + pick(r, ("NaN", "Infinity", "1e400", "-0", "0x10", "01", "1.", ".5")) + "}"


def token_from_texts(r: random.Random, header: str | bytes, payload: str | bytes, signer: str) -> str:
    h = header if isinstance(header, bytes) else header.encode("utf-8", "surrogatepass")
    p = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
    signing_input = encode_segment(r, h) + "." + encode_segment(r, p)
    return signing_input + "." + signature(signing_input, signer, r)


def make_token(r: random.Random) -> str:
    issuer = ISSUER if chance(r, 0.8) else pick(r, (SECOND_ISSUER, SECOND_ISSUER, "https://evil.example"))
    claims = base_claims(r, issuer)
    perturb_claims(r, claims, pick(r, (0, 0, 0, 1, 1, 2, 3)))
    payload = odd_json(r, claims, 0.04)
    if chance(r, 0.01):
        payload_bytes: bytes = pick(r, (b"\xff\xfe", b'{"iss":"\xff"}', b"\x00"))
        token = token_from_texts(r, header_text(r), payload_bytes, pick(r, SIGNERS))
    else:
        token = token_from_texts(r, header_text(r), payload, pick(r, SIGNERS))
    if chance(r, 0.04):
        token = token_surgery(r, token)
    return token


def token_surgery(r: random.Random, token: str) -> str:
    k = r.randrange(9)
    parts = token.split(".")
    if k == 0:
        return token + "."
    if k == 1:
        return ".".join(parts[:2])
    if k == 2:
        return token + "." + parts[-1]
    if k == 3:
        i = r.randrange(len(token) + 1)
        return token[:i] + pick(r, ("=", "+", "/", "~", "-", "_", " ", ",", "\x00", "\u00e9", "%", "..")) + token[i:]
    if k == 4:
        return token + "=" * r.randrange(1, 4)
    if k == 5:
        return token[: r.randrange(len(token) + 1)]
    if k == 6:
        return token.upper()
    if k == 7:
        return ""
    return token + "." + token


def auth_value(r: random.Random, token: str) -> str:
    k = r.randrange(30)
    if k < 22:
        return "Bearer " + token
    return pick(
        r,
        (
            "bearer " + token, "BEARER " + token, "Bearer  " + token, "Bearer\t" + token, " Bearer " + token + " ",
            "Bearer", "Bearer ", "Basic YWxpY2U6c2VjcmV0", "Bearer " + token + ", Bearer " + token,
            "Bearer " + token + " x", "Token " + token, token, "Bearer " + token + "\x00",
            "Bearer " + token + "\u00e9", "Bearer " + token.replace(".", ",", 1), "DPoP " + token,
        ),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Paths and headers
# ------------------------------------------------------------------------------------------------


def mutate_path(r: random.Random, path: str) -> str:
    k = r.randrange(14)
    if k <= 4:
        i = r.randrange(len(path) + 1)
        if chance(r, 0.5):  # at a segment boundary
            bounds = [j for j, c in enumerate(path) if c == "/"] + [len(path)]
            i = pick(r, bounds)
        return path[:i] + pick(r, PATH_FRAGMENTS) + path[i:]
    if k == 5:
        return path + pick(r, QUERIES)
    if k == 6:
        return path + "/"
    if k == 7:
        segs = path.split("/")
        j = r.randrange(len(segs))
        segs[j] = segs[j].upper() if chance(r, 0.5) else segs[j].lower()
        return "/".join(segs)
    if k == 8:
        segs = path.split("/")
        j = r.randrange(len(segs))
        segs.insert(j, segs[j])
        return "/".join(segs)
    if k == 9:
        return path.lstrip("/") if chance(r, 0.5) else "/" + path
    if k == 10 and path:
        i = r.randrange(len(path))
        hexed = f"%{ord(path[i]) & 0xFF:02X}" if ord(path[i]) < 256 else path[i]
        return path[:i] + (hexed.lower() if chance(r, 0.3) else hexed) + path[i + 1 :]
    if k == 11:
        return path + "/" + "a" * pick(r, (100, 8000, 8200, 9000))
    if k == 12 and path:
        i = r.randrange(len(path))
        return path[:i] + path[i + 1 :]
    return pick(r, ("", "*", "http://bank.example.test/healthz", "healthz", "/", "/?", "//healthz", "/healthz\x00"))


def fresh_path(r: random.Random) -> tuple[str, str]:
    method, path = pick(r, OPERATIONS)
    for _ in range(pick(r, (0, 0, 0, 1, 1, 2, 3))):
        path = mutate_path(r, path)
    if chance(r, 0.15):
        method = pick(r, METHODS)
    elif chance(r, 0.1):
        method = "POST" if method == "GET" else "GET"
    return method, path


def header_value(r: random.Random, name: str) -> bytes:
    n = name.lower()
    if n == "content-type":
        v = pick(r, CONTENT_TYPES)
    elif n == "x-device-id":
        v = pick(r, DEVICE_IDS)
    elif n == "x-forwarded-for":
        v = pick(r, ("10.0.0.1", "203.0.113.9, 10.0.0.1", "127.0.0.1"))
    elif n == "traceparent":
        v = pick(r, TRACEPARENTS)
    elif n == "tracestate":
        v = pick(r, ("congo=t61rcWkgMzE", "", "a=b,c=d", "=,=", "x" * 600))
    elif n in ("b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"):
        v = pick(r, B3_VALUES)
    elif "method" in n:
        v = pick(r, ("GET", "DELETE", "PUT", "get", "", "POST"))
    elif n.startswith("x-auth-"):
        v = pick(r, ("admin", "aal3", ISSUER, "chosen"))
    else:
        v = pick(r, ("x", "", "a,b", "\u00e9t\u00e9", "v" * 100))
    raw = v.encode("utf-8")
    if chance(r, 0.06):
        bad = pick(r, (b"\x00", b"\r\n", b"\n", b"\t", b"\x7f", b"\x01", b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc3"))
        i = r.randrange(len(raw) + 1)
        raw = raw[:i] + bad + raw[i:]
    if chance(r, 0.01):
        raw += b"y" * pick(r, (16 * 1024, 17 * 1024))
    return raw


def fresh_headers(r: random.Random, token: str | None) -> list[tuple[str, bytes]]:
    hs: list[tuple[str, bytes]] = []
    if chance(r, 0.6):
        hs.append(("content-type", pick(r, CONTENT_TYPES).encode()))
    if token is not None:
        hs.append(("authorization", auth_value(r, token).encode("utf-8", "surrogatepass")))
        if chance(r, 0.04):
            hs.append((pick(r, ("authorization", "Authorization")), auth_value(r, token).encode()))
    elif chance(r, 0.05):
        hs.append(("authorization", pick(r, (b"", b"Bearer", b"Basic x", b"Bearer a.b.c", b"Bearer \xff"))))
    for _ in range(pick(r, (0, 0, 1, 1, 2, 3))):
        name = pick(r, HEADER_NAMES)
        hs.append((name, header_value(r, name)))
    if chance(r, 0.03):
        hs.append(("content-type", pick(r, CONTENT_TYPES).encode()))
    return hs


def set_headers(r: random.Random, http: Any, hs: list[tuple[str, bytes]], form: str | None = None) -> None:
    """Write headers in the `headers` map (as Envoy does by default), in `header_map` (Envoy with
    `encode_raw_headers`), or rarely in both."""
    form = form or pick(r, ("headers", "headers", "header_map", "header_map", "header_map_value", "both"))
    http.ClearField("headers")
    http.ClearField("header_map")
    if form in ("headers", "both"):
        for k, v in hs:
            key = k if chance(r, 0.9) else k.title()
            http.headers[key] = v.decode("utf-8", "replace")
    if form in ("header_map", "header_map_value", "both"):
        for k, v in hs:
            if form == "header_map_value" and chance(r, 0.7):
                http.header_map.headers.add(key=k, value=v.decode("utf-8", "replace"))
            else:
                http.header_map.headers.add(key=k, raw_value=v)


def read_headers(http: Any) -> tuple[str, list[tuple[str, bytes]]]:
    """(form, pairs) of a request's headers."""
    if len(http.header_map.headers):
        return "header_map", [(h.key, h.raw_value or h.value.encode()) for h in http.header_map.headers]
    return "headers", [(k, v.encode()) for k, v in http.headers.items()]


# ------------------------------------------------------------------------------------------------
# Metadata and the whole request
# ------------------------------------------------------------------------------------------------


def struct_value(r: random.Random, v: Any) -> Any:
    """A Python value Struct.update accepts (Raw texts turned into what Struct can hold)."""
    if isinstance(v, Raw):
        return pick(r, (float("nan"), float("inf"), float("-inf"), 1e308, "1e400", None))
    if isinstance(v, dict):
        return {str(k): struct_value(r, x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [struct_value(r, x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def metadata_claims(r: random.Random) -> Any:
    issuer = pick(r, (ISSUER, ISSUER, ISSUER, SECOND_ISSUER, "https://evil.example"))
    claims = base_claims(r, issuer)
    perturb_claims(r, claims, pick(r, (0, 0, 1, 1, 2, 3)))
    claims.pop("pad", None)
    if chance(r, 0.05):
        return struct_value(r, pick(r, ([claims], "claims", 1.0, None, True, [])))
    if chance(r, 0.03):
        claims["nested"] = {"a": {"b": {"c": [[[[1.0]]]]}}}
    return struct_value(r, claims)


def set_metadata(r: random.Random, attrs: Any) -> None:
    md = attrs.metadata_context.filter_metadata
    key = pick(r, ("jwt_payload", "jwt_payload", "jwt_payload", "partner_payload", "other"))
    st = struct_pb2.Struct()
    st.update({key: metadata_claims(r)})
    if chance(r, 0.05):
        st.fields["extra"].CopyFrom(struct_pb2.Value())  # a Value with no kind set
    ns = JWT_AUTHN if chance(r, 0.95) else pick(r, ("envoy.filters.http.jwt_authn.x", "istio_authn"))
    md[ns].CopyFrom(st)


def generate(r: random.Random) -> Any:
    """A fresh CheckRequest."""
    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    http = attrs.request.http
    method, path = fresh_path(r)
    if chance(r, 0.97):
        http.method = method
    if chance(r, 0.98):
        http.path = path
    if chance(r, 0.9):
        http.host = pick(r, ("bank.example.test", "BANK.example.test", "", "evil.example", "bank.example.test:443"))
    kind = r.randrange(20)
    token = make_token(r) if kind < 13 else None
    hs = fresh_headers(r, token)
    if not method or chance(r, 0.02):
        hs.append((":method", pick(r, METHODS).encode("utf-8", "replace")))
    if not path or chance(r, 0.02):
        hs.append((":path", fresh_path(r)[1].encode("utf-8", "replace")))
    set_headers(r, http, hs)
    if (kind >= 13 and kind < 17) or chance(r, 0.05):
        set_metadata(r, attrs)
    if kind >= 17 or chance(r, 0.1):
        attrs.source.principal = pick(r, PRINCIPALS)
    if chance(r, 0.9):
        attrs.source.address.socket_address.address = pick(r, SOURCES)
        attrs.source.address.socket_address.port_value = 51000
    if chance(r, 0.15):
        attrs.context_extensions["sensitivity"] = pick(r, SENSITIVITIES)
    if chance(r, 0.03):
        attrs.context_extensions[pick(r, ("Sensitivity", "other", ""))] = pick(r, SENSITIVITIES)
    if chance(r, 0.05):
        extras(r, req)
    return req


def extras(r: random.Random, req: Any) -> None:
    """Fields the sidecar does not read: they must not change its answer."""
    http = req.attributes.request.http
    k = r.randrange(6)
    if k == 0:
        http.body = pick(r, ("", "{}", "x" * 1000))
    elif k == 1:
        http.raw_body = b"\x00\xff" * r.randrange(10)
    elif k == 2:
        http.query = "a=b"
        http.fragment = "frag"
    elif k == 3:
        http.scheme = pick(r, ("https", "http", ""))
        http.protocol = pick(r, ("HTTP/2", "HTTP/1.1"))
    elif k == 4:
        req.attributes.destination.principal = LEDGER
        req.attributes.destination.address.socket_address.address = "10.0.0.9"
    else:
        req.attributes.tls_session.sni = "bank.example.test"


# ------------------------------------------------------------------------------------------------
# Mutating a parsed request (atheris' custom mutator, structured half)
# ------------------------------------------------------------------------------------------------


def _current_token(pairs: list[tuple[str, bytes]]) -> str | None:
    for k, v in pairs:
        if k.lower() == "authorization":
            text = v.decode("utf-8", "replace").strip()
            scheme, _, rest = text.partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                return rest.strip()
    return None


def mutate_token(r: random.Random, token: str) -> str:
    """Change one thing in an existing token, then (usually) sign it again with the dev key, so
    that the byte-level mutations libFuzzer made to its payload reach the claim checks."""
    parts = token.split(".")
    if len(parts) != 3:
        return make_token(r) if chance(r, 0.5) else token_surgery(r, token)
    h, p = b64u_decode(parts[0]), b64u_decode(parts[1])
    if h is None or p is None:
        return make_token(r)
    k = r.randrange(10)
    if k < 6:
        try:
            claims = json.loads(p)
        except (ValueError, RecursionError):
            claims = None
        if isinstance(claims, dict):
            perturb_claims(r, claims, 1)
            try:
                p = to_json(claims).encode("utf-8", "surrogatepass")
            except RecursionError:  # a deeply nested claim that json.loads took
                p = p + b" "
        else:
            p = bytearray(p)
            if p:
                p[r.randrange(len(p))] = r.randrange(256)
            p = bytes(p)
    elif k < 8:
        try:
            header = json.loads(h)
        except (ValueError, RecursionError):
            header = None
        if isinstance(header, dict):
            name, value = pick(r, (("alg", pick(r, ALGS)), ("kid", pick(r, (KID, "x", None))), *HEADER_EXTRAS))
            header[name] = value
            try:
                h = to_json(header).encode("utf-8", "surrogatepass")
            except RecursionError:
                h = h + b" "
    elif k == 8:
        return token_surgery(r, token)
    signer = "dev" if chance(r, 0.85) else pick(r, SIGNERS)
    return token_from_texts(r, h, p, signer)


def mutate(r: random.Random, req: Any) -> Any:
    """Apply one to three field-level changes to a copy of `req`."""
    out = external_auth_pb2.CheckRequest()
    out.CopyFrom(req)
    if chance(r, 0.08):
        return generate(r)
    for _ in range(1 + r.randrange(3)):
        _mutate_once(r, out)
    return out


def _mutate_once(r: random.Random, req: Any) -> None:
    attrs = req.attributes
    http = attrs.request.http
    k = r.randrange(16)
    if k == 0:
        http.method = pick(r, METHODS) if chance(r, 0.5) else pick(r, OPERATIONS)[0]
    elif k in (1, 2):
        http.path = mutate_path(r, http.path) if chance(r, 0.7) else fresh_path(r)[1]
    elif k in (3, 4, 5):
        form, pairs = read_headers(http)
        token = _current_token(pairs)
        new_token = mutate_token(r, token) if token is not None and chance(r, 0.8) else make_token(r)
        pairs = [(a, b) for a, b in pairs if a.lower() != "authorization"]
        pairs.append(("authorization", auth_value(r, new_token).encode("utf-8", "surrogatepass")))
        set_headers(r, http, pairs, form if chance(r, 0.9) else None)
    elif k == 6:
        form, pairs = read_headers(http)
        name = pick(r, (*HEADER_NAMES, "content-type", "authorization"))
        pairs.append((name, header_value(r, name)))
        set_headers(r, http, pairs, form if chance(r, 0.9) else None)
    elif k == 7:
        form, pairs = read_headers(http)
        if pairs:
            del pairs[r.randrange(len(pairs))]
        set_headers(r, http, pairs, form)
    elif k == 8:
        form, pairs = read_headers(http)
        if pairs:
            i = r.randrange(len(pairs))
            key, value = pairs[i]
            if chance(r, 0.5):
                key = pick(r, (key.upper(), key.title(), key + " ", key))
            else:
                j = r.randrange(len(value) + 1)
                value = value[:j] + pick(r, (b"\x00", b"\t", b"\xff", b",", b" ", b"\xc3\xa9", b"\r")) + value[j:]
            pairs[i] = (key, value)
        set_headers(r, http, pairs, pick(r, ("headers", "header_map", form, form)))
    elif k == 9:
        attrs.source.principal = pick(r, PRINCIPALS)
    elif k == 10:
        attrs.source.address.socket_address.address = pick(r, SOURCES)
    elif k == 11:
        if chance(r, 0.3):
            attrs.ClearField("context_extensions")
        else:
            attrs.context_extensions["sensitivity"] = pick(r, SENSITIVITIES)
    elif k == 12:
        if chance(r, 0.3):
            attrs.ClearField("metadata_context")
        else:
            set_metadata(r, attrs)
    elif k == 13:
        field = pick(r, ("method", "path", "host", "headers", "header_map"))
        http.ClearField(field)
    elif k == 14:
        http.host = pick(r, ("bank.example.test", "", "EVIL.example"))
    else:
        extras(r, req)


def crossover(r: random.Random, a: Any, b: Any) -> Any:
    """A request with some top-level parts of `a` and the others of `b`."""
    out = external_auth_pb2.CheckRequest()
    out.CopyFrom(a)
    src, dst = b.attributes, out.attributes
    for part in ("source", "metadata_context", "context_extensions"):
        if chance(r, 0.5):
            dst.ClearField(part)
            if part == "context_extensions":
                dst.context_extensions.update(src.context_extensions)
            else:
                getattr(dst, part).CopyFrom(getattr(src, part))
    if chance(r, 0.5):
        form, pairs = read_headers(src.request.http)
        set_headers(r, dst.request.http, pairs, form)
    elif chance(r, 0.5):
        dst.request.http.path = src.request.http.path
        dst.request.http.method = src.request.http.method
    return out
