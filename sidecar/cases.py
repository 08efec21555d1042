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
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(REQUEST_KEYS))})"
        )
    at = parse_time(raw["at"], f"{where}.at") if "at" in raw else (time.time() if now is None else now)
    if "raw" in raw:
        if set(raw) - {"raw", "at"}:
            raise CaseError(f"{where}: `raw` is a whole CheckRequest: nothing but `at` goes with it")
        try:
            check = json_format.ParseDict(raw["raw"], external_auth_pb2.CheckRequest())
        except json_format.ParseError as e:
            raise CaseError(f"{where}.raw: not a CheckRequest: {e}") from None
        return BuiltRequest(check, at)

    grpc = False
    if "grpc" in raw:
        method, path, grpc = "POST", str(raw["grpc"]), True
    elif "http" in raw:
        method, _, path = str(raw["http"]).partition(" ")
        if not path:
            raise CaseError(f"{where}.http: write the method, then the path: 'GET /v1/accounts/7'")
    elif "path" in raw:
        method, path = str(raw.get("method", "GET")), str(raw["path"])
    else:
        raise CaseError(
            f'{where}: say which call: `http: "GET /path"`, `grpc: /pkg.Service/Method` or `path:`'
        )
    if "method" in raw:
        method = str(raw["method"])

    headers: list[tuple[str, str]] = []
    if grpc:
        headers.append(("content-type", "application/grpc"))
    extra = raw.get("headers", {})
    if not isinstance(extra, Mapping):
        raise CaseError(f"{where}.headers: a mapping of header names to values")
    headers += [(str(k).lower(), str(v)) for k, v in extra.items()]

    presets: dict[str, dict[str, Any]] = {}
    jwt_authn: dict[str, Any] | None = None
    if "token" in raw and "claims" in raw:
        raise CaseError(f"{where}: give `claims` (taken as verified) or a real `token`, not both")
    if "token" in raw:
        headers.append(("authorization", f"Bearer {raw['token']}"))
    elif "claims" in raw:
        claims = _claims(raw, policy, at, where)
        via = raw.get("via", "bearer")
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
        method=method, path=path, host=str(raw.get("host", "bank.example.test"))
    )
    pairs: list[tuple[str, bytes]] = [(k, v.encode()) for k, v in headers]
    if "header_map" in raw:
        hm = raw["header_map"]
        if not isinstance(hm, list) or not all(isinstance(x, list | tuple) and len(x) == 2 for x in hm):
            raise CaseError(f"{where}.header_map: a list of [name, value] pairs")
        pairs += [(str(k), v if isinstance(v, bytes) else str(v).encode()) for k, v in hm]
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
    attrs.source.address.socket_address.address = str(raw.get("source", "127.0.0.1"))
    if raw.get("principal"):
        attrs.source.principal = str(raw["principal"])
    ext = raw.get("context_extensions", {})
    if not isinstance(ext, Mapping):
        raise CaseError(f"{where}.context_extensions: a mapping")
    attrs.context_extensions.update({str(k): str(v) for k, v in ext.items()})
    if jwt_authn is not None:
        st = struct_pb2.Struct()
        st.update(json.loads(json.dumps(jwt_authn)))
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


def _claims(raw: Mapping[str, Any], policy: Policy, at: float, where: str) -> dict[str, Any]:
    claims = raw["claims"]
    if not isinstance(claims, Mapping):
        raise CaseError(f"{where}.claims: the token's claims, a mapping")
    out: dict[str, Any] = json.loads(json.dumps(claims, default=str))
    issuer = _issuer(raw, policy, where)
    out.setdefault("iss", issuer.issuer)
    if issuer.audiences:
        out.setdefault("aud", sorted(issuer.audiences)[0])
    out.setdefault("iat", int(at))
    out.setdefault("exp", int(at) + 3600)
    if "auth_age" in raw:
        age_v = raw["auth_age"]
        if isinstance(age_v, str) and age_v.strip().isdigit():  # plain seconds, as from --auth-age
            age_v = int(age_v)
        try:
            if isinstance(age_v, bool):
                raise ValueError
            age = parse_duration(age_v)
            if age < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError, IndexError):
            raise CaseError(
                f"{where}.auth_age: {raw['auth_age']!r} is not a duration (e.g. 90, 90s, 15m)"
            ) from None
        out[issuer.claims.auth_time] = int(at) - age
    return out


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
