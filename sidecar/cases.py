"""A request described for people (a YAML/JSON mapping) -> the CheckRequest Envoy would send.

Shared by `stepup-sidecar test` (a case's `request:`) and `stepup-sidecar explain`. Keys:

    http: "GET /v1/accounts/7"        an HTTP call (method, then the raw path with its query)
    grpc: /bank.v1.Accounts/GetBalance an gRPC call (POST, content-type application/grpc)
    method:, path:                     the same, spelled out (any method, any raw path)
    claims: {...}                      the token's claims as the IdP issues them, any JSON shape;
                                       taken as verified (no key needed)
    issuer: ID                         whose claims (default: the policy's first issuer); fills
                                       `iss`, and `aud`/`exp`/`iat` when the claims leave them out
    via: bearer | jwt_authn            how the claims arrive (default: bearer; jwt_authn puts them
                                       in Envoy's jwt_authn metadata under the issuer's key)
    token: "eyJ..."                    a real token instead, verified against the policy's issuers
    at: 2026-12-02T10:00:00Z           the time of the call (default: now); epoch seconds too
    auth_age: 90s                      sets auth_time to `at` minus this (duration or seconds)
    principal: spiffe://...            the mTLS peer
    source: 203.0.113.9                the peer address (default 127.0.0.1)
    headers: {x-device-id: laptop-7}   more request headers
    header_map: [[x-a, "1"], [x-a, "2"]]  headers as Envoy sends them with encode_raw_headers
                                       (repeated keys kept apart; a value may be !!binary)
    context_extensions: {sensitivity: critical}
    host: bank.example.test
    raw: {...}                         a whole CheckRequest as JSON instead (nothing else then)

Claims "taken as verified" ride on a placeholder bearer token that a `PresetVerifier` answers
with the given claims; everything else (attributes, engine, response) runs as for a real Check.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from sidecar import reasons as R
from sidecar._proto.envoy.config.core.v3 import base_pb2
from sidecar._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from sidecar.attributes import JWT_AUTHN_NAMESPACE
from sidecar.policy import Policy
from sidecar.policyfile import parse_duration
from sidecar.text import is_text
from sidecar.tokens import AuthError, Trust, Verified, Verifier

REQUEST_KEYS = frozenset(
    {
        "http",
        "grpc",
        "method",
        "path",
        "claims",
        "issuer",
        "via",
        "token",
        "at",
        "auth_age",
        "principal",
        "source",
        "headers",
        "context_extensions",
        "host",
        "header_map",
        "raw",
    }
)
PLACEHOLDER_PREFIX = "stepup-test-claims."


class CaseError(ValueError):
    """A request description that cannot be built; the message names the place."""


@dataclass(frozen=True)
class BuiltRequest:
    """The CheckRequest, the time it is made at, and the claims behind its placeholder token."""

    check: Any
    at: float
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    is_grpc: bool = False


_EPOCH = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_LATEST = 253402300799.0  # 9999-12-31T23:59:59Z: later instants have no date to show
_AGE = re.compile(r"[0-9]{1,12}[smhd]?")  # ASCII digits only: "²".isdigit(), but int("²") fails
MAX_CLAIM_DEPTH = 64  # JSON's encoder runs out of stack deeper
# jwt_authn metadata is a protobuf Struct: each claim level is three message levels, and protobuf
# refuses a message nested more than 100 deep.
MAX_METADATA_CLAIM_DEPTH = 30
_MAX_CLAIM_VALUES = 100_000  # YAML aliases can make a small file a huge (or endless) claim set
_DOUBLE_MAX = 2**1024  # the first integer a double (jwt_authn metadata's number) cannot hold


def _text(value: Any, where: str) -> str:
    """The value as text a CheckRequest can carry: UTF-8 cannot encode a lone surrogate (YAML's
    "\\udc80", JSON's too, or a command-line byte that is not UTF-8)."""
    text = str(value)
    if not is_text(text):
        at = next(i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff")
        raise CaseError(
            f"{where}: {text!r} is not text UTF-8 can carry (a lone surrogate,"
            f" U+{ord(text[at]):04X}, at character {at})"
        )
    return text


def parse_time(value: Any, where: str) -> float:
    """An instant from ISO 8601 (naive means UTC) or epoch seconds (a number, or digits as text,
    as from --at), between 1970 and 9999."""
    bad = CaseError(f"{where}: {value!r} is not a time (ISO 8601 or epoch seconds, 1970 to 9999)")
    if isinstance(value, str) and _EPOCH.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not 0 <= value <= _LATEST:  # also NaN, infinities
            raise bad
        return float(value)
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise bad from None
    else:
        raise bad
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        stamp = when.timestamp()
    except (OverflowError, ValueError, OSError):
        raise bad from None
    if not 0 <= stamp <= _LATEST:
        raise bad
    return stamp


def build_request(
    raw: Mapping[str, Any], policy: Policy, where: str, *, now: float | None = None
) -> BuiltRequest:
    """The CheckRequest a request description stands for (CaseError names what is wrong)."""
    if not isinstance(raw, Mapping):
        raise CaseError(f"{where}: a request is a mapping")
    unknown = set(raw) - REQUEST_KEYS
    if unknown:
        raise CaseError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}"
            f" (known: {', '.join(sorted(REQUEST_KEYS))})"
        )
    at = parse_time(raw["at"], f"{where}.at") if "at" in raw else (time.time() if now is None else now)
    if "raw" in raw:
        if set(raw) - {"raw", "at"}:
            raise CaseError(f"{where}: `raw` is a whole CheckRequest: nothing but `at` goes with it")
        try:
            check = json_format.ParseDict(raw["raw"], external_auth_pb2.CheckRequest())
        except (json_format.ParseError, ValueError, OverflowError, RecursionError) as e:
            # ValueError includes a string UTF-8 cannot carry; OverflowError a number beyond a
            # double in a Struct (metadata).
            raise CaseError(f"{where}.raw: not a CheckRequest: {e}") from None
        return BuiltRequest(check, at)

    grpc = False
    if "grpc" in raw:
        method, path, grpc = "POST", _text(raw["grpc"], f"{where}.grpc"), True
    elif "http" in raw:
        method, _, path = _text(raw["http"], f"{where}.http").partition(" ")
        if not path:
            raise CaseError(f"{where}.http: write the method, then the path: 'GET /v1/accounts/7'")
    elif "path" in raw:
        method, path = "GET", _text(raw["path"], f"{where}.path")
    else:
        raise CaseError(
            f'{where}: say which call: `http: "GET /path"`, `grpc: /pkg.Service/Method` or `path:`'
        )
    if "method" in raw:
        method = _text(raw["method"], f"{where}.method")

    headers: list[tuple[str, str]] = []
    if grpc:
        headers.append(("content-type", "application/grpc"))
    extra = raw.get("headers", {})
    if not isinstance(extra, Mapping):
        raise CaseError(f"{where}.headers: a mapping of header names to values")
    headers += [
        (_text(k, f"{where}.headers").lower(), _text(v, f"{where}.headers.{k!s}")) for k, v in extra.items()
    ]

    presets: dict[str, dict[str, Any]] = {}
    jwt_authn: dict[str, Any] | None = None
    if "token" in raw and "claims" in raw:
        raise CaseError(f"{where}: give `claims` (taken as verified) or a real `token`, not both")
    if "token" in raw:
        headers.append(("authorization", f"Bearer {_text(raw['token'], f'{where}.token')}"))
    elif "claims" in raw:
        via = raw.get("via", "bearer")
        claims = _claims(raw, policy, at, where, metadata=via == "jwt_authn")
        if via == "bearer":
            placeholder = PLACEHOLDER_PREFIX + secrets.token_hex(8)  # unique: identities are memoised
            presets[placeholder] = claims
            headers.append(("authorization", f"Bearer {placeholder}"))
        elif via == "jwt_authn":
            issuer = _issuer(raw, policy, where)
            if not issuer.jwt_authn_payload:
                raise CaseError(f"{where}.via: issuer {issuer.id!r} has no jwt_authn_payload")
            jwt_authn = {issuer.jwt_authn_payload: claims}
        else:
            raise CaseError(f"{where}.via: bearer or jwt_authn, not {via!r}")

    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, path=path, host=_text(raw.get("host", "bank.example.test"), f"{where}.host")
    )
    pairs: list[tuple[str, bytes]] = [(k, v.encode()) for k, v in headers]
    if "header_map" in raw:
        hm = raw["header_map"]
        if not isinstance(hm, list) or not all(isinstance(x, list | tuple) and len(x) == 2 for x in hm):
            raise CaseError(f"{where}.header_map: a list of [name, value] pairs")
        pairs += [
            (
                _text(k, f"{where}.header_map[{i}][0]"),
                v if isinstance(v, bytes) else _text(v, f"{where}.header_map[{i}][1]").encode(),
            )
            for i, (k, v) in enumerate(hm)
        ]
    if "header_map" in raw or len({k for k, _ in headers}) != len(headers):
        # As Envoy sends them with encode_raw_headers: repeated keys kept apart.
        http.header_map.CopyFrom(
            base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs])
        )
    else:
        http.headers.update(dict(headers))
    attrs = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)
    )
    attrs.source.address.socket_address.address = _text(raw.get("source", "127.0.0.1"), f"{where}.source")
    if raw.get("principal"):
        attrs.source.principal = _text(raw["principal"], f"{where}.principal")
    ext = raw.get("context_extensions", {})
    if not isinstance(ext, Mapping):
        raise CaseError(f"{where}.context_extensions: a mapping")
    attrs.context_extensions.update(
        {
            _text(k, f"{where}.context_extensions"): _text(v, f"{where}.context_extensions.{k!s}")
            for k, v in ext.items()
        }
    )
    if jwt_authn is not None:
        st = struct_pb2.Struct()
        try:
            st.update(jwt_authn)  # checked by _claims: depth, text, numbers a double holds
        except (ValueError, OverflowError, TypeError, RecursionError) as e:
            raise CaseError(f"{where}.claims: not what jwt_authn metadata can carry: {e}") from None
        attrs.metadata_context.filter_metadata[JWT_AUTHN_NAMESPACE].CopyFrom(st)
    return BuiltRequest(external_auth_pb2.CheckRequest(attributes=attrs), at, presets, grpc)


def _issuer(raw: Mapping[str, Any], policy: Policy, where: str) -> Any:
    if "issuer" in raw:
        for i in policy.issuers:
            if i.id == raw["issuer"]:
                return i
        known = ", ".join(i.id for i in policy.issuers)
        raise CaseError(f"{where}.issuer: no issuer {raw['issuer']!r} in the policy (known: {known})")
    return policy.issuers[0]


def _claims(
    raw: Mapping[str, Any], policy: Policy, at: float, where: str, *, metadata: bool = False
) -> dict[str, Any]:
    """The claims as JSON (a date as its text), with iss/aud/iat/exp/auth_time filled in.
    `metadata`: they travel as jwt_authn metadata, a protobuf Struct, which holds neither text
    UTF-8 cannot encode nor a number beyond a double (a bearer token's JSON holds both)."""
    claims = raw["claims"]
    if not isinstance(claims, Mapping):
        raise CaseError(f"{where}.claims: the token's claims, a mapping")
    _check_claims(claims, f"{where}.claims", metadata=metadata)
    try:
        out: dict[str, Any] = json.loads(json.dumps(claims, default=str))
    except (ValueError, TypeError, RecursionError) as e:  # after the checks, a safety net only
        raise CaseError(f"{where}.claims: not JSON: {e}") from None
    issuer = _issuer(raw, policy, where)
    out.setdefault("iss", issuer.issuer)
    if issuer.audiences:
        out.setdefault("aud", sorted(issuer.audiences)[0])
    out.setdefault("iat", int(at))
    out.setdefault("exp", int(at) + 3600)
    if "auth_age" in raw:
        age_v = raw["auth_age"]
        try:
            if isinstance(age_v, str) and _AGE.fullmatch(age_v.strip()) and age_v.strip().isdigit():
                age_v = int(age_v)  # plain seconds, as from --auth-age
            if isinstance(age_v, bool) or (isinstance(age_v, str) and not _AGE.fullmatch(age_v)):
                raise ValueError
            age = parse_duration(age_v)
            if not 0 <= age <= _LATEST:
                raise ValueError
        except (ValueError, KeyError, TypeError, IndexError):
            raise CaseError(
                f"{where}.auth_age: {raw['auth_age']!r} is not a duration (e.g. 90, 90s, 15m)"
            ) from None
        out[issuer.claims.auth_time] = int(at) - age
    return out


def _check_claims(claims: Mapping[str, Any], where: str, *, metadata: bool) -> None:
    """Refuse, at its place, what the claims cannot be turned into: nesting deeper than
    MAX_CLAIM_DEPTH (checked in a loop: recursion is what would fail), a name that is not text
    (JSON's object keys are strings), and for `metadata` a string UTF-8 cannot encode or an
    integer a double cannot hold."""
    todo: list[tuple[Any, str, int]] = [(claims, where, 0)]
    seen = 0
    while todo:
        value, place, depth = todo.pop()
        seen += 1
        if seen > _MAX_CLAIM_VALUES:
            raise CaseError(f"{where}: more than {_MAX_CLAIM_VALUES} values (YAML aliases?)")
        limit = MAX_METADATA_CLAIM_DEPTH if metadata else MAX_CLAIM_DEPTH
        if isinstance(value, Mapping | list | tuple) and depth >= limit:
            top = place[len(where) :].lstrip(".").split(".")[0].split("[")[0]
            raise CaseError(
                f"{where}{'.' + top if top else ''}: nested more than {limit} levels deep"
                + (" (jwt_authn metadata, a protobuf Struct, holds no more)" if metadata else "")
            )
        if isinstance(value, Mapping):
            for k, v in value.items():
                if not isinstance(k, str | int | float | bool) and k is not None:
                    raise CaseError(f"{place}: the claim name {k!r} is not text")
                if metadata and isinstance(k, str):
                    _text(k, place)
                todo.append((v, f"{place}.{k}", depth + 1))
        elif isinstance(value, list | tuple):
            todo.extend((v, f"{place}[{i}]", depth + 1) for i, v in enumerate(value))
        elif metadata and isinstance(value, str):
            _text(value, place)
        elif metadata and isinstance(value, int) and not -_DOUBLE_MAX < value < _DOUBLE_MAX:
            digits = len(str(abs(value))) if abs(value) < 10**4000 else "thousands of"
            raise CaseError(
                f"{place}: an integer of {digits} digits, beyond what jwt_authn metadata (a"
                " protobuf Struct, whose numbers are doubles) can carry"
            )


class PresetVerifier(Verifier):
    """A Verifier that answers placeholder tokens with preset claims (as if their signature had
    verified under the issuer's keys) and verifies every other token for real."""

    def __init__(self) -> None:
        super().__init__()
        self.presets: dict[str, dict[str, Any]] = {}

    def verify(self, token: str, trusted: Mapping[str, Trust], now: float, *, count: bool = True) -> Verified:
        claims = self.presets.get(token)
        if claims is None:
            return super().verify(token, trusted, now, count=count)
        iss = claims.get("iss")
        t = trusted.get(iss) if isinstance(iss, str) else None
        if t is None:
            why = "the claims' issuer is not one whose tokens this policy verifies"
            raise AuthError(R.UNKNOWN_ISSUER, why)
        return Verified(dict(claims), t.issuer, t.algorithms[0], t.keys, t.keys.keyset())
