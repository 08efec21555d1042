"""The bypass corpus (tests/data/bypass_corpus.yaml): hostile requests and the answer each must get.

Every case runs in-process (attributes -> engine -> response) and again through the in-process
gRPC server; both must give the stated outcome, status and reason, a well-formed CheckResponse,
and, on allow, identity headers that overwrite or remove whatever the client sent.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format

from sidecar import response
from sidecar.attributes import from_check_request
from sidecar.compiler import load_policy_text
from sidecar.engine import Engine
from sidecar.policy import Policy
from tests.helpers import ACR_PHR, ACR_PHRH, EXAMPLE_POLICY, NOW, check_request, make_token
from tests.test_server import Running

CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "bypass_corpus.yaml").read_text())
GRPC_CODE = {400: 3, 401: 16, 403: 7}
IDENTITY_HEADERS = ("x-auth-subject", "x-auth-issuer", "x-auth-assurance", "x-auth-decision-id")


@functools.cache
def token(name: str) -> str:
    builders = {
        "teller": lambda: make_token(),
        "teller_phr": lambda: make_token(acr=ACR_PHR),
        "teller_phrh": lambda: make_token(acr=ACR_PHRH),
        "admin_phrh": lambda: make_token(sub="root", roles=["admin"], acr=ACR_PHRH),
        "oversized": lambda: make_token(pad="x" * 7000),  # over 8 KiB, header under 16 KiB
        "huge": lambda: make_token(pad="x" * 20000),  # header over 16 KiB
    }
    return builders[name]()


@functools.cache
def policy(name: str) -> Policy:
    doc = yaml.safe_load(EXAMPLE_POLICY.read_text())
    if name != "example":
        overlay = CORPUS["policies"][name]
        doc["sensitivity"]["rules"] = overlay["sensitivity_rules"]
        doc["permissions"] = overlay["permissions"]
        if "paths" in overlay:
            doc["paths"] = overlay["paths"]
    return load_policy_text(yaml.safe_dump(doc), file=f"<{name}>", base_dir=EXAMPLE_POLICY.parent)


def _text(value: str) -> str:
    """Expand `@pad:N`, `@pathpad:N` and `{token}` placeholders."""
    if m := re.fullmatch(r"@pad:(\d+)", value):
        return "x" * int(m[1])
    if m := re.fullmatch(r"@pathpad:(\d+)", value):
        return "/" + "a" * int(m[1])
    return re.sub(r"\{(\w+)\}", lambda m: token(m[1]), value)


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else _text(value).encode("utf-8")


def build(case: dict[str, Any]) -> Any:
    """The CheckRequest a case describes."""
    if "raw" in case:
        return json_format.ParseDict(case["raw"], external_auth_pb2.CheckRequest())
    grpc = bool(case.get("grpc", False))
    header_map = None
    if "header_map" in case:
        header_map = []
        if grpc:
            header_map.append(("content-type", b"application/grpc"))
        if "token" in case:
            header_map.append(("authorization", b"Bearer " + token(case["token"]).encode()))
        header_map += [(k, _bytes(v)) for k, v in case["header_map"]]
    return check_request(
        _text(case["path"]),
        method=_text(case["method"]),
        token=token(case["token"]) if "token" in case else None,
        headers={k: _text(v) for k, v in case.get("headers", {}).items()},
        header_map=header_map,
        grpc=grpc,
        source=case.get("source", "127.0.0.1"),
        principal=case.get("principal", ""),
        host=case.get("host", "bank.example.test"),
        context_extensions=case.get("context_extensions"),
    )


def _client_header_names(case: dict[str, Any]) -> set[str]:
    names = {k.lower() for k in case.get("headers", {})}
    names |= {k.lower() for k, _ in case.get("header_map", [])}
    return names


def _params() -> Iterator[Any]:
    for case in CORPUS["cases"]:
        marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if "xfail" in case else []
        yield pytest.param(case, id=case["id"], marks=marks)


def assert_answer(case: dict[str, Any], wire: Any, is_grpc: bool) -> None:
    """The wire answer is the expected one, well formed, and safe for the upstream on allow."""
    outcome, status, reason = case["expect"]
    if outcome == "allow":
        assert wire.status.code == 0, f"denied: {wire.status.message}"
        assert wire.HasField("ok_response") and not wire.HasField("denied_response")
        ok = wire.ok_response
        set_ = {o.header.key: o.header.value for o in ok.headers}
        assert {o.append_action for o in ok.headers} == {
            base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        }
        # Every identity header the client sent is overwritten or removed.
        for name in _client_header_names(case) & set(IDENTITY_HEADERS):
            assert name in set_ or name in ok.headers_to_remove, name
        assert set_.get("x-auth-decision-id", "") not in ("", "chosen")
        for k, v in case.get("upstream", {}).get("set", {}).items():
            assert set_[k] == v
        for k in case.get("upstream", {}).get("remove", []):
            assert k in ok.headers_to_remove and k not in set_
        return
    assert wire.status.code == GRPC_CODE[status], (wire.status.code, wire.status.message)
    assert wire.status.message == reason
    assert not wire.HasField("ok_response") and wire.HasField("denied_response")
    denied = wire.denied_response
    assert denied.status.code == status
    headers = {h.header.key: h.header.value for h in denied.headers}
    if is_grpc:
        assert headers["grpc-status"] == str(GRPC_CODE[status])
        assert "grpc-status-details-bin" in headers
    else:
        assert "grpc-status" not in headers
        assert json.loads(denied.body)["reason"] == reason
    assert ("www-authenticate" in headers) == (status in (400, 401))


@pytest.mark.parametrize("case", list(_params()))
def test_corpus_in_process(case: dict[str, Any]) -> None:
    """attributes -> engine -> response gives the stated answer."""
    p = policy(case.get("policy", "example"))
    attrs = from_check_request(build(case))
    d = Engine(p).decide(attrs, NOW)
    assert (d.outcome.value, d.http_status, d.reason) == tuple(case["expect"])
    wire = (
        response.allow(d, "0123456789abcdef", p.upstream_headers)
        if d.allowed
        else response.deny(d, "0123456789abcdef", p.realm, attrs.is_grpc)
    )
    assert_answer(case, wire, attrs.is_grpc)


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    r = Running()
    yield r
    r.stop()


@pytest.mark.parametrize("case", list(_params()))
def test_corpus_through_grpc(server: Running, case: dict[str, Any]) -> None:
    """The same answer over a real gRPC channel (serialisation, servicer, telemetry)."""
    req = build(case)
    server.runtime.swap(policy(case.get("policy", "example")))
    try:
        wire = server.check(req)
    finally:
        server.runtime.swap(policy("example"))
    assert_answer(case, wire, from_check_request(req).is_grpc)
    assert server.metrics.registry.get_sample_value("stepup_internal_errors_total") == 0
