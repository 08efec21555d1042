"""Property-based tests of the Check handler against a deliberately simple reference evaluator.

Hypothesis builds requests from the example policy's path segments plus hostile fragments, tokens
from the example issuer with random roles, scopes, acr, amr, auth_time and exp (some corrupted),
principals, sources, headers in both forms and route context extensions. For each one the
handler (AuthorizationServicer.Check, fed the request after a wire round trip) must:

- return a well-formed CheckResponse (OK <-> ok_response; otherwise denied_response with status
  400/401/403, the matching gRPC code, and a grpc-status header for gRPC callers);
- never fail internally;
- give the same allow/deny answer as `Reference`, a slow, straightforward reading of
  examples/policy.yaml written here without the sidecar's code (in particular: never allow what
  the reference denies).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from joserfc.jwk import RSAKey, import_key

from sidecar.config import load_policy
from sidecar.server import AuthorizationServicer, Decider
from sidecar.telemetry import Metrics, Telemetry
from tests.helpers import EXAMPLE_POLICY, ISSUER, NOW, PRIVATE_JWK, FixedClock, check_request, make_token

POLICY_DOC = yaml.safe_load(EXAMPLE_POLICY.read_text())
GRPC_CODE = {400: 3, 401: 16, 403: 7}
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": PRIVATE_JWK["kid"]})
DEV_KEY = import_key(PRIVATE_JWK)  # imported once: loading an RSA private key is slow

# --------------------------------------------------------------------------------------------
# The reference: plain loops over the policy document, its own normalisation and ordering.
# --------------------------------------------------------------------------------------------

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
RAW_ALLOWED = UNRESERVED + "!$&'()*+,;=:@/%?#"


def ref_normalise(raw: str) -> str | None:
    """RFC 3986 path, query/fragment dropped, unreserved escapes decoded, dot-segments resolved,
    slashes merged; None for anything unsafe."""
    if raw == "" or len(raw) > 8192 or raw[0] != "/":
        return None
    for ch in raw:
        if ch not in RAW_ALLOWED:
            return None
    path = raw
    for sep in "?#":
        if sep in path:
            path = path[: path.index(sep)]
    if ";" in path:
        return None
    text = ""
    octets = b""
    i = 0
    while i < len(path):
        if path[i] != "%":
            text += path[i]
            octets += path[i].encode()
            i += 1
            continue
        hexpart = path[i + 1 : i + 3]
        if len(hexpart) < 2 or any(c not in "0123456789abcdefABCDEF" for c in hexpart):
            return None
        value = int(hexpart, 16)
        if value < 0x20 or value == 0x7F or chr(value) in "/\\%":
            return None
        text += chr(value) if chr(value) in UNRESERVED else "%" + hexpart.upper()
        octets += bytes([value])
        i += 3
    try:
        octets.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pieces = text.split("/")[1:]
    out: list[str] = []
    for n, piece in enumerate(pieces):
        last = n == len(pieces) - 1
        if piece == "..":
            if not out:
                return None
            out.pop()
            if last:
                out.append("")
        elif piece == ".":
            if last:
                out.append("")
        elif piece == "" and not last:
            pass
        else:
            out.append(piece)
    return "/" + "/".join(out)


def ref_rank(pattern: str, method: str, path: str) -> tuple[int, ...] | None:
    """None if `pattern` does not match; else a sort key, smaller = more specific."""
    pmethod, _, ppath = pattern.rpartition(" ")
    pmethod = pmethod or "*"
    if pmethod not in ("*", method):
        return None
    want = ppath.split("/")[1:]
    have = path.split("/")[1:]
    key: list[int] = []
    for i, w in enumerate(want):
        if w == "**":
            key.append(2)
            break
        if i >= len(have):
            return None
        if w == "*":
            if have[i] == "":
                return None
            key.append(1)
        elif w == have[i]:
            key.append(0)
        else:
            return None
    else:
        if len(want) != len(have):
            return None
        key.append(0)  # ends exactly here: before a '**' that would match nothing more
    key.append(0 if pmethod != "*" else 1)
    return tuple(key)


@dataclass
class Claims:
    """What a generated token says, and whether it is genuine."""

    roles: list[str]
    scope: str
    acr: str | None
    amr: list[str] | None
    auth_age: int | None  # seconds before NOW; negative = in the future
    exp_in: int
    defect: str  # "" or bad_signature / wrong_audience / wrong_issuer / alg_none / garbage


@dataclass
class Req:
    method: str
    path: str
    grpc: bool
    form: str  # "headers" or "header_map"
    auth: str  # none / bearer / lower / twice / joined / basic / empty
    claims: Claims | None
    principal: str
    source: str
    extra: dict[str, str] = field(default_factory=dict)
    bad_utf8: bool = False
    extension: str | None = None


class Reference:
    """Slow, obvious evaluation of examples/policy.yaml; returns (outcome, status)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.levels: list[str] = doc["assurance"]["levels"]
        self.skew = 60
        self.issuer = doc["issuers"][0]
        self.acr_level = {
            v: self.levels.index(name) for name, e in self.issuer["acr"].items() for v in e["accept"]
        }

    def sensitivity(self, method: str, path: str) -> str | None:
        best: tuple[tuple[int, ...], str] | None = None
        for rule in self.doc["sensitivity"]["rules"]:
            for pattern in rule["match"]:
                rank = ref_rank(pattern, method, path)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, rule["level"])
        return None if best is None else best[1]

    def level_spec(self, name: str) -> dict[str, Any]:
        spec = self.doc["sensitivity"]["levels"][name]
        return {
            "public": spec.get("authentication") == "none",
            "min": self.levels.index(spec["min_assurance"]) if "min_assurance" in spec else None,
            "max_age": parse_age(spec.get("max_age")),
        }

    def decide(self, r: Req) -> tuple[str, int]:
        path = ref_normalise(r.path)
        if path is None:
            return "deny", 400
        if r.bad_utf8 or any(bad_header(v) for v in header_values(r)):
            return "deny", 400
        method = r.method.upper()
        if not method or not all(c.isalpha() for c in method):
            return "deny", 400
        level = self.sensitivity(method, path)
        if level is None:
            return "deny", 403
        spec = self.level_spec(level)
        if r.extension is not None:
            if r.extension not in self.doc["sensitivity"]["levels"]:
                return "deny", 403
            ext = self.level_spec(r.extension)
            spec = {
                "public": spec["public"] and ext["public"],
                "min": max([x for x in (spec["min"], ext["min"]) if x is not None], default=None),
                "max_age": min([x for x in (spec["max_age"], ext["max_age"]) if x is not None], default=None),
            }
        if spec["public"]:
            return "allow", 200
        if r.auth in ("twice", "joined"):
            return "deny", 400
        user: Claims | None = None
        if r.auth in ("bearer", "lower"):
            c = r.claims
            assert c is not None
            if c.defect or c.exp_in < -self.skew or (c.auth_age is not None and c.auth_age < -self.skew):
                return "unauthenticated", 401
            user = c
        elif r.auth == "empty":
            return "unauthenticated", 401
        elif not r.principal:
            return "unauthenticated", 401
        # The permission table: any matching grant.
        granted = False
        workload = False
        for rule in self.doc["permissions"]:
            if not any(ref_rank(p, method, path) is not None for p in rule["match"]):
                continue
            allow = rule["allow"]
            if allow.get("anyone"):
                granted = True
            elif set(allow) == {"principals"}:
                if user is None and r.principal in allow["principals"]:
                    granted, workload = True, True
            elif user is not None:
                roles_ok = "roles" not in allow or bool(set(allow["roles"]) & set(user.roles))
                scopes_ok = "scopes" not in allow or bool(set(allow["scopes"]) & set(user.scope.split()))
                granted = granted or (roles_ok and scopes_ok)
        if not granted:
            return ("unauthenticated", 401) if user is None else ("deny", 403)
        if workload:
            return "allow", 200
        assert user is not None
        minimum, max_age = spec["min"], spec["max_age"]
        if self.untrusted(r.source):
            minimum = min((minimum if minimum is not None else -1) + 1, len(self.levels) - 1)
            max_age = 1800 if max_age is None else min(max_age, 1800)
        have = self.user_level(user)
        if minimum is not None and (have is None or have < minimum):
            return "step_up", 401
        if max_age is not None and (user.auth_age is None or user.auth_age > max_age + self.skew):
            return "step_up", 401
        return "allow", 200

    def user_level(self, c: Claims) -> int | None:
        if c.acr is not None and c.acr in self.acr_level:
            return self.acr_level[c.acr]
        if not c.amr:
            return None
        knowledge = {"pwd", "pin", "kba"} & set(c.amr)
        possession = {"hwk", "swk", "otp", "sms", "tel", "sc", "pop"} & set(c.amr)
        inherence = {"fpt", "face", "iris", "retina", "vbm", "bio", "user"} & set(c.amr)
        classes = sum(1 for s in (knowledge, possession, inherence) if s)
        return 1 if "mfa" in c.amr or classes >= 2 else 0

    def untrusted(self, source: str) -> bool:
        try:
            ip = ipaddress.ip_address(source)
        except ValueError:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        nets = self.doc["risk"][0]["when"]["source_not_in"]
        return not any(ip in ipaddress.ip_network(n) for n in nets)


def parse_age(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, int):
        return v
    return int(v[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[v[-1]]


def header_values(r: Req) -> Iterator[str]:
    yield from r.extra.values()


def bad_header(v: str) -> bool:
    return len(v) > 16 * 1024 or any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in v)


REF = Reference(POLICY_DOC)

# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------

SEGMENTS = ["v1", "accounts", "7", "balance", "admin", "users", "transfers", "healthz", "x"]
HOSTILE = [
    "..",
    ".",
    "",
    "%2e%2e",
    "%2E.",
    ".%2e",
    "%2F",
    "%2f",
    "%5C",
    "%00",
    ";x",
    "..;",
    "%61dmin",
    "%c0%ae",
    "%zz",
    "%",
    "%25",
    "%3F",
    "%23",
    "a b",
    "\u00e9",
    "\\",
    "\t",
    "%c3%a9",
    "ADMIN",
]
SUFFIXES = ["", "", "", "?q=/../v1/admin", "#/../admin", "/", "//", "?", "#"]
GRPC_PATHS = [
    f"/bank.v1.{s}/{m}"
    for s in ("Accounts", "Payments", "Admin", "Vault")
    for m in ("GetBalance", "Transfer", "SetPermissions", "List")
]
LEDGER = "spiffe://cluster.local/ns/bank/sa/ledger"


OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/v1/accounts/7/balance"),
    ("GET", "/v1/accounts/7"),
    ("GET", "/v1/accounts/7/history/2024"),
    ("POST", "/v1/transfers"),
    ("GET", "/v1/admin/users"),
    ("DELETE", "/v1/admin/users/3"),
    *(("POST", p) for p in GRPC_PATHS),
]


def chance(draw: st.DrawFn, percent: int) -> bool:
    """True with about `percent` % probability; False for hypothesis' favourite (zero) draws, so the
    benign branch is the simple one that shrinking moves towards."""
    return draw(st.integers(0, 99)) >= 100 - percent


@st.composite
def operations(draw: st.DrawFn, fragments: list[str]) -> tuple[str, str]:
    """A real operation, often bent by a hostile fragment, or a path made of loose segments."""
    if not chance(draw, 25):
        method, path = draw(st.sampled_from(OPERATIONS))
        if chance(draw, 40):
            segs = path.split("/")
            at = draw(st.integers(1, len(segs)))
            segs.insert(at, draw(st.sampled_from(fragments)))
            path = "/".join(segs)
        if chance(draw, 15):
            path = draw(st.sampled_from(["/healthz/..", "/v1/accounts/%2e%2e/..", "//", "/."])) + path
    else:
        method = draw(st.sampled_from(["GET", "POST"]))
        segs = draw(st.lists(st.sampled_from(SEGMENTS + fragments), min_size=0, max_size=6))
        path = "/" + "/".join(segs)
    if chance(draw, 20):
        path += draw(st.sampled_from(SUFFIXES))
    if chance(draw, 10):
        method = draw(st.sampled_from(["PUT", "get", "FOO", "", "*", "G T", "POST"]))
    return method, path


claims_strategy = st.builds(
    Claims,
    roles=st.lists(
        st.sampled_from(["teller", "customer", "admin", "auditor"]), min_size=1, max_size=2, unique=True
    ),
    scope=st.sampled_from(["", "payments", "read payments", "pay"]),
    acr=st.sampled_from(
        [
            None,
            "",
            "urn:okta:loa:1fa:any",
            "urn:okta:loa:2fa:any",
            "http://schemas.openid.net/pape/policies/2007/06/multi-factor",
            "phr",
            "phrh",
            "gold",
        ]
    ),
    amr=st.sampled_from([None, [], ["pwd"], ["pwd", "otp"], ["mfa"], ["hwk", "face"], ["foo"], ["sms"]]),
    auth_age=st.sampled_from([None, 0, 100, 1000, 1830, 1900, 3650, 3700, 43000, 44000, -30, -600]),
    exp_in=st.sampled_from([600, 600, 600, -30, -120]),
    defect=st.sampled_from(
        ["", "", "", "", "", "", "bad_signature", "wrong_audience", "wrong_issuer", "garbage"]
    ),
)


@st.composite
def requests(draw: st.DrawFn, fragments: list[str] = HOSTILE) -> Req:
    auth = draw(
        st.sampled_from(
            ["none", "bearer", "bearer", "bearer", "bearer", "lower", "twice", "joined", "basic", "empty"]
        )
    )
    extra: dict[str, str] = {}
    for name in draw(
        st.lists(
            st.sampled_from(
                [
                    "x-auth-subject",
                    "x-envoy-original-path",
                    "x-forwarded-for",
                    "x-note",
                    "x-forwarded-client-cert",
                ]
            ),
            max_size=2,
            unique=True,
        )
    ):
        clean = ["admin", "/healthz", "10.0.0.1", "a\tb", f"URI={LEDGER}"]
        hostile = ["a\x00b", "a\r\nb", "x" * 17000, "\x7f"]
        extra[name] = draw(st.sampled_from(hostile if chance(draw, 15) else clean))
    method, path = draw(operations(fragments))
    return Req(
        method=method,
        path=path,
        grpc=path.startswith("/bank.") and not chance(draw, 20),
        form=draw(st.sampled_from(["headers", "header_map"])),
        auth=auth,
        claims=draw(claims_strategy) if auth != "none" else None,
        principal=draw(
            st.sampled_from(["", "", "", LEDGER, LEDGER + "x", "spiffe://cluster.local/ns/bank/sa/(ledger)"])
        ),
        source=draw(
            st.sampled_from(
                ["127.0.0.1", "127.0.0.1", "10.1.2.3", "203.0.113.9", "", "::1", "::ffff:127.0.0.1", "bogus"]
            )
        ),
        extra=extra,
        bad_utf8=chance(draw, 5),
        extension=draw(st.sampled_from(["public", "low", "critical", "bogus"])) if chance(draw, 10) else None,
    )


@functools.lru_cache(maxsize=4096)
def _token(c_key: str) -> str:
    c = json.loads(c_key)
    claims: dict[str, Any] = {"roles": c["roles"], "scope": c["scope"], "exp": NOW + c["exp_in"]}
    drop = []
    for name in ("acr", "amr"):
        if c[name] is None:
            drop.append(name)
        else:
            claims[name] = c[name]
    if c["auth_age"] is None:
        drop.append("auth_time")
    else:
        claims["auth_time"] = NOW - c["auth_age"]
    defect = c["defect"]
    if defect == "wrong_audience":
        claims["aud"] = "other-api"
    if defect == "wrong_issuer":
        claims["iss"] = "https://evil.example"
    if defect == "garbage":
        return "a.b.c"
    return make_token(key=OTHER_KEY if defect == "bad_signature" else DEV_KEY, drop=tuple(drop), **claims)


def to_check_request(r: Req) -> Any:
    tok = ""
    if r.claims is not None:
        tok = _token(json.dumps(r.claims.__dict__, sort_keys=True))
    auth_values = {
        "none": [],
        "bearer": [f"Bearer {tok}"],
        "lower": [f"bearer {tok}"],
        "twice": [f"Bearer {tok}", f"Bearer {tok}"],
        "joined": [f"Bearer {tok},Bearer {tok}"],
        "basic": ["Basic YTpi"],
        "empty": ["Bearer "],
    }[r.auth]
    pairs: list[tuple[str, str]] = [("authorization", v) for v in auth_values] + list(r.extra.items())
    if r.grpc:
        pairs.append(("content-type", "application/grpc"))
    headers: dict[str, str] = {}
    header_map = None
    if r.form == "header_map" or r.bad_utf8:
        header_map = [(k, v.encode()) for k, v in pairs]
        if r.bad_utf8:
            header_map.append(("x-raw", b"\xc3\x28"))
    else:
        for k, v in pairs:
            headers[k] = f"{headers[k]},{v}" if k in headers else v  # Envoy comma-joins repeats
    req = check_request(
        r.path,
        method=r.method,
        headers=headers,
        header_map=header_map,
        grpc=False,
        source=r.source,
        principal=r.principal,
        context_extensions={"sensitivity": r.extension} if r.extension is not None else None,
    )
    return external_auth_pb2.CheckRequest.FromString(req.SerializeToString())


# --------------------------------------------------------------------------------------------
# The handler under test
# --------------------------------------------------------------------------------------------


class Handler:
    def __init__(self) -> None:
        self.metrics = Metrics()
        telemetry = Telemetry(None, decision_log=None, metrics=self.metrics)
        self.servicer = AuthorizationServicer(
            Decider(load_policy(EXAMPLE_POLICY), telemetry, FixedClock(NOW))
        )
        self.loop = asyncio.new_event_loop()

    def check(self, req: Any) -> Any:
        return self.loop.run_until_complete(self.servicer.Check(req, None))

    def close(self) -> None:
        self.loop.close()


@pytest.fixture(scope="module")
def handler() -> Iterator[Handler]:
    h = Handler()
    yield h
    h.close()


def assert_well_formed(resp: Any, is_grpc: bool) -> None:
    if resp.status.code == 0:
        assert resp.HasField("ok_response") and not resp.HasField("denied_response")
        return
    assert resp.HasField("denied_response") and not resp.HasField("ok_response")
    status = resp.denied_response.status.code
    assert status in GRPC_CODE and resp.status.code == GRPC_CODE[status]
    assert resp.status.message  # the reason code
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    if is_grpc:
        assert headers["grpc-status"] == str(resp.status.code)
    else:
        assert json.loads(resp.denied_response.body)["reason"] == resp.status.message


def outcome_of(resp: Any) -> str:
    return "allow" if resp.status.code == 0 else "deny"


COMMON = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _check_one(handler: Handler, r: Req) -> None:
    before = handler.metrics.registry.get_sample_value("stepup_internal_errors_total")
    resp = handler.check(to_check_request(r))
    assert handler.metrics.registry.get_sample_value("stepup_internal_errors_total") == before
    assert_well_formed(resp, r.grpc)
    expected, expected_status = REF.decide(r)
    got = outcome_of(resp)
    event(f"{got}: {resp.status.message or 'ok'}")
    if got == "allow":
        assert expected == "allow", f"ALLOWED but the reference says {expected} {expected_status}: {r}"
    else:
        assert expected != "allow", f"denied ({resp.status.message}) but the reference allows: {r}"
        assert resp.denied_response.status.code == expected_status, (resp.status.message, r)


@COMMON
@given(r=requests())
def test_check_agrees_with_the_reference(handler: Handler, r: Req) -> None:
    """Well formed, never an internal error, and the reference's answer and status."""
    _check_one(handler, r)


@settings(COMMON, max_examples=50, phases=[Phase.generate])
@given(r=requests().map(lambda r: replace(r, path=r.path + "\n")))
def test_check_agrees_with_the_reference_with_trailing_newlines(handler: Handler, r: Req) -> None:
    """Same property, with a raw LF at the end of the path: the reference refuses it (400)."""
    _check_one(handler, r)


def test_reference_sanity() -> None:
    """The reference itself reads the policy as documented (guards against a vacuous property)."""
    teller = Claims(["teller"], "payments", "urn:okta:loa:1fa:any", ["pwd"], 10, 600, "")
    r = Req("POST", "/bank.v1.Payments/Transfer", True, "headers", "bearer", teller, "", "127.0.0.1")
    assert REF.decide(r) == ("step_up", 401)
    assert REF.decide(
        Req("GET", "/v1/accounts/7/balance", False, "headers", "bearer", teller, "", "10.0.0.1")
    ) == (
        "allow",
        200,
    )
    assert REF.decide(Req("GET", "/healthz?x", False, "headers", "none", None, "", "")) == ("allow", 200)
    assert REF.decide(
        Req("POST", "/bank.v1.Accounts/GetBalance", True, "headers", "none", None, LEDGER, "")
    ) == (
        "allow",
        200,
    )
    assert ref_normalise("/a/%2e%2E/b//c/.") == "/b/c/"
    assert ref_normalise("/a%2fb") is None and ref_normalise("/healthz\n") is None
    assert ISSUER == POLICY_DOC["issuers"][0]["issuer"]
