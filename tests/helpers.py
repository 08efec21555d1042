"""Shared builders for tests: tokens signed with the example key, CheckRequests, a fixed clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2
from joserfc import jwt
from joserfc.jwk import import_key

from sidecar._proto.envoy.config.core.v3 import base_pb2
from sidecar._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"
PRIVATE_JWK = json.loads((ROOT / "examples" / "keys" / "dev-private-jwk.json").read_text())
ISSUER = "https://idp.example.test"
NOW = 1_800_000_000  # fixed "now" for engine tests

ACR_1FA = "urn:okta:loa:1fa:any"
ACR_2FA = "urn:okta:loa:2fa:any"
ACR_PHR = "phr"
ACR_PHRH = "phrh"


def example_policy_text(*replacements: tuple[str, str]) -> str:
    """The example policy's text, usable from any directory (JWKS path made absolute), with
    (old, new) replacements applied; each `old` must occur."""
    text = EXAMPLE_POLICY.read_text().replace("jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


class FixedClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_token(
    *,
    now: float = NOW,
    header: dict[str, Any] | None = None,
    key: Any = None,
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A token from the example issuer; any claim can be overridden or dropped."""
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "bank-api",
        "sub": "alice",
        "iat": int(now) - 10,
        "exp": int(now) + 600,
        "auth_time": int(now) - 10,
        "roles": ["teller"],
        "scope": "payments",
        "acr": ACR_1FA,
        "amr": ["pwd"],
    }
    body.update(claims)
    for k in drop:
        body.pop(k, None)
    hdr = {"alg": "RS256", "kid": PRIVATE_JWK["kid"], "typ": "JWT"}
    hdr.update(header or {})
    return jwt.encode(hdr, body, key or import_key(PRIVATE_JWK))


def check_request(
    path: str = "/bank.v1.Accounts/GetBalance",
    *,
    method: str = "POST",
    token: str | None = None,
    headers: dict[str, str] | None = None,
    header_map: list[tuple[str, bytes]] | None = None,
    grpc: bool = True,
    source: str = "127.0.0.1",
    principal: str = "",
    jwt_payload: dict[str, Any] | None = None,
    context_extensions: dict[str, str] | None = None,
    host: str = "bank.example.test",
) -> Any:
    """Build a CheckRequest as Envoy sends it (`headers` form unless `header_map` is given)."""
    hdrs: dict[str, str] = {}
    if grpc:
        hdrs["content-type"] = "application/grpc"
    if token is not None:
        hdrs["authorization"] = f"Bearer {token}"
    hdrs.update(headers or {})
    http = attribute_context_pb2.AttributeContext.HttpRequest(method=method, path=path, host=host)
    if header_map is not None:
        http.header_map.CopyFrom(
            base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in header_map])
        )
    else:
        http.headers.update(hdrs)
    attrs = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http),
    )
    if source:
        attrs.source.address.socket_address.address = source
    if principal:
        attrs.source.principal = principal
    if context_extensions:
        attrs.context_extensions.update(context_extensions)
    if jwt_payload is not None:
        st = struct_pb2.Struct()
        st.update({"jwt_payload": jwt_payload})
        attrs.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(st)
    return external_auth_pb2.CheckRequest(attributes=attrs)
