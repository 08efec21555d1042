"""The bypass corpus (tests/data/bypass/*.test.yaml): hostile requests and the answer each must get,
in the `stepup-sidecar test` format (one format for policy tests and the corpus).

Every case runs through the test runner (attributes -> engine -> response, in-process) and again
through the in-process gRPC server; both must give the stated answer, a well-formed CheckResponse,
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

from sidecar._proto.envoy.config.core.v3 import base_pb2
from sidecar.cases import PresetVerifier
from sidecar.compiler import load_policy
from sidecar.policy import Policy
from sidecar.policytest import Case, Result, Suite, load_suite, run_suite
from tests.helpers import NOW
from tests.test_server import Running

CORPUS = Path(__file__).parent / "data" / "bypass"
GRPC_CODE = {400: 3, 401: 16, 403: 7}
IDENTITY_HEADERS = ("x-auth-subject", "x-auth-issuer", "x-auth-assurance", "x-auth-decision-id")


def _expand(value: Any) -> Any:
    """`@pad:N` -> N 'x's, `@pathpad:N` -> '/' and N 'a's (strings too long to write in YAML)."""
    if isinstance(value, str):
        value = re.sub(r"@pathpad:(\d+)", lambda m: "/" + "a" * int(m[1]), value)
        return re.sub(r"@pad:(\d+)", lambda m: "x" * int(m[1]), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


@functools.cache
def suite(name: str) -> Suite:
    s = load_suite(CORPUS / name)
    for case in s.cases:
        case.request = _expand(case.request)
        if "raw" not in case.request:
            case.request.setdefault("at", NOW)  # the in-process server's fixed clock
    return s


@functools.cache
def policy(name: str) -> Policy:
    p = suite(name).policy_file
    assert p is not None
    return load_policy(p)


@functools.cache
def results(name: str) -> dict[str, Result]:
    return {r.case.name: r for r in run_suite(suite(name), policy(name))}


def _params() -> Iterator[Any]:
    for f in sorted(CORPUS.glob("*.test.yaml")):
        for case in load_suite(f).cases:
            yield pytest.param(f.name, case.name, id=f"{f.stem.removesuffix('.test')}:{case.name}")


def _client_header_names(case: Case) -> set[str]:
    names = {k.lower() for k in case.request.get("headers", {})}
    names |= {str(k).lower() for k, _ in case.request.get("header_map", [])}
    return names


def assert_well_formed(case: Case, wire: Any) -> None:
    """The wire answer is well formed, and safe for the upstream on allow."""
    if wire.status.code == 0:
        assert wire.HasField("ok_response") and not wire.HasField("denied_response")
        ok = wire.ok_response
        set_ = {o.header.key: o.header.value for o in ok.headers}
        assert {o.append_action for o in ok.headers} == {base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD}
        for name in _client_header_names(case) & set(IDENTITY_HEADERS):
            assert name in set_ or name in ok.headers_to_remove, name
        assert set_.get("x-auth-decision-id", "") not in ("", "chosen")
        return
    status = wire.denied_response.status.code
    assert wire.status.code == GRPC_CODE[status], (wire.status.code, wire.status.message)
    assert not wire.HasField("ok_response") and wire.HasField("denied_response")
    headers = {h.header.key: h.header.value for h in wire.denied_response.headers}
    is_grpc = any(
        str(k).lower() == "content-type" and str(v).startswith("application/grpc")
        for k, v in [*case.request.get("headers", {}).items(), *case.request.get("header_map", [])]
    )
    if is_grpc:
        assert headers["grpc-status"] == str(GRPC_CODE[status])
        assert "grpc-status-details-bin" in headers
    else:
        assert "grpc-status" not in headers
        assert json.loads(wire.denied_response.body)["reason"] == wire.status.message
    assert ("www-authenticate" in headers) == (status in (400, 401))


@pytest.mark.parametrize(("file", "name"), list(_params()))
def test_corpus_in_process(file: str, name: str) -> None:
    """attributes -> engine -> response gives the stated answer, well formed."""
    r = results(file)[name]
    assert r.passed, r.diffs
    assert_well_formed(r.case, r.response)


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    r = Running()
    r.runtime.verifier = PresetVerifier()  # knows the claims behind the runner's placeholders
    yield r
    r.stop()


@pytest.mark.parametrize(("file", "name"), list(_params()))
def test_corpus_through_grpc(server: Running, file: str, name: str) -> None:
    """The same answer over a real gRPC channel (serialisation, servicer, telemetry)."""
    r = results(file)[name]
    verifier = server.runtime.verifier
    assert isinstance(verifier, PresetVerifier)
    verifier.presets.update(r.presets)
    server.runtime.swap(policy(file))
    try:
        wire = server.check(r.request)
    finally:
        server.runtime.swap(policy("example.test.yaml"))
    assert (wire.status.code, wire.status.message) == (r.response.status.code, r.response.status.message)
    assert wire.denied_response.status.code == r.response.denied_response.status.code
    assert_well_formed(r.case, wire)
    assert server.metrics.registry.get_sample_value("stepup_internal_errors_total") == 0


def test_the_corpus_files_are_all_read_and_no_case_is_there_twice() -> None:
    params = list(_params())
    assert len(params) >= 150
    assert len({p.values for p in params}) == len(params)
    assert {f.name for f in CORPUS.glob("*.test.yaml")} == {
        "example.test.yaml",
        "docs.test.yaml",
        "docs-caseless.test.yaml",
        "principals.test.yaml",
        "reserved.test.yaml",
    }
