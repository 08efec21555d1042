"""In-process gRPC: Check, Explain, health and reflection over a real channel; spans and logs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import sidecar
from sidecar._proto.envoy.config.core.v3 import base_pb2
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from sidecar._proto.stepup.v1 import explain_pb2_grpc
from sidecar.compiler import load_policy
from sidecar.keys import KeyStore
from sidecar.runtime import Runtime
from sidecar.server import build_server, set_serving
from sidecar.telemetry import Metrics, Telemetry
from tests.helpers import ACR_PHR, EXAMPLE_POLICY, NOW, FixedClock, check_request, make_token

TRANSFER = "/bank.v1.Payments/Transfer"
LINE_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((Path(sidecar.__file__).parent / "decision-line.schema.json").read_text())
)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Running:
    def __init__(self, policy: Any = None) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.log = io.StringIO()
        self.metrics = Metrics()
        self.telemetry = Telemetry(provider, decision_log=self.log, metrics=self.metrics)
        keys = KeyStore()  # one per process, as in `serve`
        policy = policy or load_policy(EXAMPLE_POLICY, keys=keys)
        self.runtime = Runtime(policy, self.telemetry, FixedClock(NOW), keys=keys)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server, self.health = build_server(self.runtime)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await set_serving(self.health, True)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def check(self, req: Any) -> Any:
        return external_auth_pb2_grpc.AuthorizationStub(self.channel).Check(req, timeout=5)

    def log_lines(self) -> list[dict[str, Any]]:
        """The decision lines so far, each checked against the published schema."""
        lines = [json.loads(x) for x in self.log.getvalue().splitlines()]
        for line in lines:
            LINE_SCHEMA.validate(line)
        return lines

    def stop(self) -> None:
        self.channel.close()
        self.call(self.server.stop(1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def srv() -> Iterator[Running]:
    r = Running()
    yield r
    r.stop()


def _headers(opts: Any) -> dict[str, str]:
    return {o.header.key: o.header.value for o in opts}


def test_step_up_answer_for_a_grpc_caller(srv: Running) -> None:
    resp = srv.check(check_request(TRANSFER, token=make_token()))
    assert resp.status.code == 16
    assert resp.denied_response.status.code == 401
    h = _headers(resp.denied_response.headers)
    assert h["www-authenticate"] == (
        'Bearer realm="bank", error="insufficient_user_authentication", '
        'error_description="a stronger authentication is required: a phishing-resistant login", acr_values="phr phrh"'
    )
    assert h["grpc-status"] == "16"
    st = status_pb2.Status.FromString(base64.b64decode(h["grpc-status-details-bin"]))
    assert st.code == 16 and st.message == resp.denied_response.body
    info = error_details_pb2.ErrorInfo()
    assert st.details[0].Unpack(info)
    assert info.reason == "INSUFFICIENT_USER_AUTHENTICATION" and info.domain == "stepup-sidecar"
    assert info.metadata["acr_values"] == "phr phrh" and "max_age" not in info.metadata
    assert resp.denied_response.body == (
        "insufficient_user_authentication: a stronger authentication is required: a phishing-resistant login"
    )


def test_step_up_answer_for_an_http_caller_is_json(srv: Running) -> None:
    req = check_request("/v1/transfers", method="POST", grpc=False, token=make_token(auth_time=NOW - 7200))
    resp = srv.check(req)
    h = _headers(resp.denied_response.headers)
    assert h["content-type"] == "application/json" and "grpc-status" not in h
    body = json.loads(resp.denied_response.body)
    assert body == {
        "error": "insufficient_user_authentication",
        "error_description": "a stronger authentication is required: a phishing-resistant login within the last hour",
        "acr_values": "phr phrh",
        "max_age": 3600,
        "reason": "acr_too_low",
        "decision_id": body["decision_id"],
    }
    assert len(body["decision_id"]) == 16


def test_allow_overwrites_and_removes_identity_headers(srv: Running) -> None:
    req = check_request(TRANSFER, token=make_token(acr=ACR_PHR), headers={"x-auth-subject": "mallory"})
    resp = srv.check(req)
    assert resp.status.code == 0
    ok = resp.ok_response
    h = _headers(ok.headers)
    assert h["x-auth-subject"] == "alice" and h["x-auth-assurance"] == "aal2_phr"
    assert h["x-auth-issuer"] == "https://idp.example.test" and len(h["x-auth-decision-id"]) == 16
    assert {o.append_action for o in ok.headers} == {base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD}
    assert list(ok.headers_to_remove) == []


def test_public_allow_removes_client_sent_identity_headers(srv: Running) -> None:
    resp = srv.check(check_request("/healthz", method="GET", grpc=False, headers={"x-auth-subject": "admin"}))
    assert resp.status.code == 0
    assert set(resp.ok_response.headers_to_remove) == {"x-auth-subject", "x-auth-issuer", "x-auth-assurance"}


def test_empty_check_request_is_denied_not_crashed(srv: Running) -> None:
    resp = srv.check(external_auth_pb2.CheckRequest())
    assert resp.status.code == 3 and resp.denied_response.status.code == 400
    assert json.loads(resp.denied_response.body)["reason"] == "invalid_path"


def test_unexpected_error_fails_closed_and_is_traced(srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(srv.runtime.engine, "decide_remembered", boom)
    resp = srv.check(check_request(TRANSFER, token=make_token(acr=ACR_PHR)))
    assert resp.status.code == 7 and resp.denied_response.status.code == 403
    span = srv.exporter.get_finished_spans()[-1]
    assert span.attributes is not None and span.attributes["authz.reason"] == "internal_error"
    assert span.status.status_code.name == "ERROR"
    assert srv.log_lines()[-1]["reason"] == "internal_error"


def test_span_joins_the_callers_w3c_trace(srv: Running) -> None:
    token = make_token()
    srv.check(check_request(TRANSFER, token=token, headers={"traceparent": TRACEPARENT}))
    (span,) = srv.exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    a = dict(span.attributes or {})
    assert a["authz.outcome"] == "step_up" and a["authz.reason"] == "acr_too_low"
    assert a["authz.rules"] == ("transfer", "tellers-transfer")
    assert a["authz.sensitivity"] == "high"
    assert a["authz.required_assurance"] == "aal2_phr" and a["authz.presented_assurance"] == "aal1"
    assert a["authz.policy_version"].startswith("bank-demo@")
    assert a["authz.subject"] == "alice" and len(a["authz.decision_id"]) == 16
    line = srv.log_lines()[-1]
    assert line["trace_id"] == TRACE_ID and line["decision_id"] == a["authz.decision_id"]
    assert line["reason"] == "acr_too_low" and line["rules"] == ["transfer", "tellers-transfer"]


def test_span_joins_a_b3_trace(srv: Running) -> None:
    srv.check(
        check_request(
            TRANSFER,
            headers={"x-b3-traceid": TRACE_ID, "x-b3-spanid": "00f067aa0ba902b7", "x-b3-sampled": "1"},
        )
    )
    (span,) = srv.exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_no_token_or_credential_reaches_spans_or_logs(srv: Running) -> None:
    token = make_token()
    sig = token.split(".")[2]
    for req in (
        check_request(TRANSFER, token=token, headers={"cookie": "session=SECRETCOOKIE"}),
        check_request(TRANSFER, token=make_token(exp=1)),
        check_request(TRANSFER, headers={"authorization": f"Bearer {token},Bearer {token}"}),
    ):
        srv.check(req)
    dumped = srv.log.getvalue() + "".join(s.to_json() for s in srv.exporter.get_finished_spans())
    assert len(srv.exporter.get_finished_spans()) == 3
    for secret in (token, sig, "SECRETCOOKIE", "Bearer"):
        assert secret not in dumped


def test_metrics_count_decisions(srv: Running) -> None:
    srv.check(check_request(TRANSFER, token=make_token()))
    srv.check(check_request(TRANSFER, token=make_token(acr=ACR_PHR)))
    reg = srv.metrics.registry
    assert (
        reg.get_sample_value("stepup_decisions_total", {"outcome": "step_up", "reason": "acr_too_low"}) == 1
    )
    assert reg.get_sample_value("stepup_decisions_total", {"outcome": "allow", "reason": "allowed"}) == 1
    assert reg.get_sample_value("stepup_check_duration_seconds_count") == 2


def test_health_reports_serving_per_service(srv: Running) -> None:
    stub = health_pb2_grpc.HealthStub(srv.channel)
    for service in ("", "envoy.service.auth.v3.Authorization"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    srv.call(set_serving(srv.health, False))
    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_and_describes_services(srv: Running) -> None:
    db = ProtoReflectionDescriptorDatabase(srv.channel)
    assert set(db.get_services()) == {
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "stepup.v1.Explain",
    }
    fd = db.FindFileContainingSymbol("envoy.service.auth.v3.CheckRequest")
    assert fd.package == "envoy.service.auth.v3"


def test_explain_says_why(srv: Running) -> None:
    stub = explain_pb2_grpc.ExplainStub(srv.channel)
    resp = stub.Explain(check_request(TRANSFER, token=make_token(auth_time=NOW - 7200)), timeout=5)
    assert (resp.outcome, resp.reason, resp.http_status) == ("step_up", "acr_too_low", 401)
    assert list(resp.matched_rules) == ["transfer", "tellers-transfer"]
    assert resp.requirement.min_assurance == "aal2_phr" and resp.requirement.max_age_seconds == 3600
    assert resp.presented.assurance == "aal1" and resp.presented.auth_age_seconds == 7200
    assert resp.presented.credential == "bearer" and resp.presented.subject == "alice"
    assert 'acr_values="phr phrh", max_age=3600' in resp.www_authenticate
    assert resp.normalized_path == TRANSFER
