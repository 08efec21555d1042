"""The operator's port of a real `serve` process: /metrics scraped over HTTP and parsed, /healthz,
/readyz; a candidate policy and a shadow rule seen in the metrics and the decision log; a broken
candidate rejected and counted while the active policy keeps answering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from examples.stack import free_port, wait_serving
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests.helpers import ACR_2FA, ACR_PHR, check_request, example_policy_text, make_token

TRANSFER = "/bank.v1.Payments/Transfer"
BALANCE = "/bank.v1.Accounts/GetBalance"
SHADOW = (
    "    - {id: admin, match:",
    f'    - {{id: balance-critical, match: ["{BALANCE}"], level: critical, mode: shadow}}\n'
    "    - {id: admin, match:",
)
LINE_SCHEMA = jsonschema.Draft202012Validator(
    json.loads(subprocess.run([sys.executable, "-m", "sidecar", "schema", "--decision-log"],
                              capture_output=True, check=True, text=True).stdout)
)  # fmt: skip
TIGHTER = ('"POST /v1/transfers"], level: high', '"POST /v1/transfers"], level: critical')


@dataclass
class Serving:
    proc: subprocess.Popen[str]
    listen: str
    ops: str
    policy: Path
    candidate: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.ops}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        time.sleep(0.7)  # plain-integer counters are synced every half second
        code, text = self.get("/metrics")
        assert code == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def check(self, req: Any) -> Any:
        with grpc.insecure_channel(self.listen) as ch:
            return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def start(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Serving:
    policy, candidate = tmp / "policy.yaml", tmp / "candidate.yaml"
    policy.write_text(example_policy_text(SHADOW))
    candidate.write_text(example_policy_text(TIGHTER).replace("name: bank-demo", "name: bank-next"))
    listen, ops = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--candidate", str(candidate),
         "--listen", listen, "--metrics-listen", ops, "--watch-interval", "0", "--drain-delay", "2", *extra],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_serving(listen)
    return Serving(proc, listen, ops, policy, candidate)


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serving]:
    s = start(tmp_path)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        s.proc.communicate(timeout=10)


def _m(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def test_metrics_health_and_readiness_over_http(serving: Serving) -> None:
    assert serving.get("/healthz") == (200, "ok\n")
    assert serving.get("/readyz") == (200, "ready\n")
    assert serving.get("/nope")[0] == 404
    token = make_token(now=time.time(), acr=ACR_PHR)
    for _ in range(3):
        assert serving.check(check_request(TRANSFER, token=token)).status.code == 0
    shadowed = make_token(now=time.time(), acr=ACR_2FA, sub="erin")
    assert serving.check(check_request(BALANCE, token=shadowed)).status.code == 0
    m = serving.metrics()
    assert m[_m("stepup_decisions_total", outcome="allow", reason="allowed")] == 4
    assert m[_m("stepup_decisions_by_sensitivity_total", sensitivity="high", outcome="allow")] == 3
    # two tokens, each verified once; the other lookups hit (the candidate's are not counted)
    assert m[_m("stepup_token_cache_total", result="miss")] == 2
    assert m[_m("stepup_token_cache_total", result="hit")] == 2
    assert m[_m("stepup_candidate_disagreements_total", active="allow", candidate="step_up", reason="acr_too_low")] == 3
    assert m[_m("stepup_shadow_disagreements_total", rule="balance-critical", would="step_up")] == 1
    assert m[_m("stepup_candidate_reloads_total", result="applied")] == 1
    info = {dict(labels)["role"]: dict(labels) for (name, labels), v in m.items() if name == "stepup_policy_info" and v == 1}
    assert info["active"]["name"] == "bank-demo" and info["candidate"]["name"] == "bank-next"
    assert info["active"]["version"] == f"bank-demo@{info['active']['hash']}"
    assert len(info["active"]["hash"]) >= 12
    # A broken candidate: rejected and counted; the active policy answers as before.
    serving.candidate.write_text("version: 1\nthis is: [not a policy\n")
    serving.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while serving.metrics().get(_m("stepup_candidate_reloads_total", result="rejected"), 0) != 1:
        assert time.monotonic() < deadline
    m = serving.metrics()
    assert m[_m("stepup_policy_reloads_total", result="applied")] == 1  # (the SIGHUP reloaded it too)
    assert serving.check(check_request(TRANSFER, token=token)).status.code == 0
    info = {dict(labels)["role"]: dict(labels) for (name, labels), v in serving.metrics().items() if name == "stepup_policy_info" and v == 1}
    assert info["candidate"]["name"] == "bank-next"  # the last good candidate is still decided
    # SIGTERM: not ready at once (drain), while still alive and answering.
    serving.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert serving.get("/readyz")[0] == 503
    assert serving.get("/healthz")[0] == 200
    out, err = serving.proc.communicate(timeout=20)
    assert serving.proc.returncode == 0
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert [x["candidate"]["agrees"] for x in lines if x["reason"] == "allowed"] == [False, False, False, True, False]
    for line in lines:  # the published contract holds for the lines of a real run
        LINE_SCHEMA.validate(line)
    assert any("shadow" in x for x in lines) and all("candidate" in x for x in lines)
    assert "candidate policy reload rejected; keeping bank-next@" in err


def test_allowed_decisions_can_be_sampled_in_the_decision_log(tmp_path: Path) -> None:
    s = start(tmp_path, "--decision-log-sample-allowed", "0")
    try:
        s.candidate.unlink()  # no candidate: its disagreements would be logged regardless
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while s.metrics().get(_m("stepup_candidate_reloads_total", result="removed"), 0) != 1:
            assert time.monotonic() < deadline
        token = make_token(now=time.time(), acr="phrh")
        for _ in range(20):
            assert s.check(check_request(BALANCE, token=token, headers={"x-device-id": "d"})).status.code == 0
        assert s.check(check_request(TRANSFER)).status.code == 16  # a denial: always logged
        weak = make_token(now=time.time(), acr=ACR_2FA, sub="frank")
        assert s.check(check_request(BALANCE, token=weak)).status.code == 0  # shadow disagreement: logged
        s.proc.send_signal(signal.SIGTERM)
        out, _ = s.proc.communicate(timeout=20)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    for line in lines:
        LINE_SCHEMA.validate(line)
    assert [(x["outcome"], x["reason"], "shadow" in x) for x in lines] == [
        ("unauthenticated", "missing_credential", False),
        ("allow", "allowed", True),
    ]


def test_the_decision_line_schema_names_every_reason_and_refuses_what_is_not_a_line() -> None:
    from sidecar.reasons import REASONS

    props = LINE_SCHEMA.schema["properties"]
    assert set(props["reason"]["enum"]) == set(REASONS)
    assert set(props["candidate"]["properties"]["reason"]["enum"]) == set(REASONS)
    jsonschema.Draft202012Validator.check_schema(LINE_SCHEMA.schema)
    good = {
        "ts": 1.5, "event": "decision", "trace_id": "", "span_id": "", "decision_id": "0123456789abcdef",
        "outcome": "allow", "reason": "allowed", "http_status": 200, "rules": ["a"], "sensitivity": "low",
        "required_assurance": "aal1", "required_max_age": -1, "risk_rules": [], "presented_assurance": "aal1",
        "subject": "alice", "issuer": "https://i", "principal": "", "credential": "bearer",
        "policy_version": "p@1", "method": "GET", "grpc": False, "duration_us": 12.5,
    }  # fmt: skip
    LINE_SCHEMA.validate(good)
    for bad in ({"outcome": "maybe"}, {"reason": "because"}, {"token": "x"}, {"decision_id": "xyz"},
                {"shadow": []}, {"candidate": {"outcome": "allow"}}):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            LINE_SCHEMA.validate({**good, **bad})


def test_sampled_allowed_lines_say_their_rate() -> None:
    import io

    from sidecar.compiler import load_policy
    from sidecar.runtime import Runtime
    from sidecar.telemetry import Metrics, Telemetry
    from tests.helpers import EXAMPLE_POLICY, NOW, FixedClock

    log = io.StringIO()
    tel = Telemetry(None, decision_log=log, metrics=Metrics())
    tel.sample_allowed = 0.5
    rt = Runtime(load_policy(EXAMPLE_POLICY), tel, FixedClock(NOW))
    import asyncio

    token = make_token(acr=ACR_PHR)
    for i in range(200):
        ev = asyncio.run(rt.evaluate(check_request(BALANCE, token=token)))
        rt.record(ev, f"{i:016x}", 0)
    ev = asyncio.run(rt.evaluate(check_request(TRANSFER)))
    rt.record(ev, "f" * 16, 0)
    lines = [json.loads(x) for x in log.getvalue().splitlines()]
    allowed = [x for x in lines if x["outcome"] == "allow"]
    assert 60 <= len(allowed) <= 140  # 200 at rate 0.5 (more than 5 sigma either way)
    assert all(x["sample_rate"] == 0.5 for x in allowed)
    assert lines[-1]["reason"] == "missing_credential" and "sample_rate" not in lines[-1]
    assert tel.metrics.registry.get_sample_value(
        "stepup_decisions_total", {"outcome": "allow", "reason": "allowed"}
    ) == 200  # metrics count every decision
    for line in lines:
        LINE_SCHEMA.validate(line)
