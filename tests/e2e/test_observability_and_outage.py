"""Trace continuity, fail-closed behaviour when the sidecar is down, and Envoy config validity."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import e2e_stack as st
import grpc
import pytest
from e2e_helpers import http_request, metadata_values

from sidecar._proto.bank.v1 import bank_pb2, bank_pb2_grpc

pytestmark = pytest.mark.e2e


def _balance(address: str, token: str | None, extra: tuple[tuple[str, str], ...] = ()) -> Any:
    md = ((("authorization", f"Bearer {token}"),) if token else ()) + extra
    with grpc.insecure_channel(address) as ch:
        try:
            _, call = bank_pb2_grpc.AccountsStub(ch).GetBalance.with_call(
                bank_pb2.GetBalanceRequest(account_id="acc-1"), metadata=md, timeout=5
            )
            return grpc.StatusCode.OK, call
        except grpc.RpcError as e:
            return e.code(), e


def test_traceparent_continues_into_the_sidecar_span(envoy: st.Envoy, sidecar: st.Sidecar) -> None:
    """A gRPC call with a W3C traceparent yields a sidecar span in that trace, child of the caller's
    span; the decision log line carries the same trace id; the upstream gets traceparent unchanged."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{parent_id}-01"
    code, call = _balance(envoy.address, st.mint(acr=st.AAL1), (("traceparent", traceparent),))
    assert code == grpc.StatusCode.OK
    md = call.initial_metadata()
    assert metadata_values(md, "x-echo-traceparent") == [traceparent]
    (decision_id,) = metadata_values(md, "x-echo-x-auth-decision-id")

    assert sidecar.decision(decision_id)["trace_id"] == trace_id
    deadline = time.monotonic() + 5
    while True:  # the batch span processor exports every 100 ms (OTEL_BSP_SCHEDULE_DELAY)
        spans = [s for s in sidecar.spans() if s["context"]["trace_id"] == f"0x{trace_id}"]
        if spans or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (span,) = spans
    assert span["name"] == "ext_authz.check"
    assert span["kind"] == "SpanKind.SERVER"
    assert span["parent_id"] == f"0x{parent_id}"
    assert span["attributes"]["authz.decision_id"] == decision_id
    assert span["attributes"]["authz.outcome"] == "allow"


@pytest.fixture
def fragile(tmp_path: Path, bank: st.Bank) -> Iterator[tuple[st.Envoy, st.Sidecar]]:
    """A private sidecar + Envoy pair, so that stopping this sidecar disturbs no other test."""
    side = st.new_sidecar(tmp_path, "sidecar-fragile", console_spans=False)
    env = st.new_envoy(tmp_path, st.ENVOY_YAML, "envoy-fragile", ext_authz=side.port, upstream=bank)
    with st.running(side, env):
        side.start()
        env.start()
        yield env, side


def test_sidecar_down_fails_closed_and_recovers(fragile: tuple[st.Envoy, st.Sidecar]) -> None:
    """Sidecar stopped: HTTP 503 and gRPC UNAVAILABLE (status_on_error), never an allow; Envoy
    counts errors, not failure_mode_allowed. With the sidecar back on its port, calls pass again."""
    env, side = fragile
    token = st.mint(acr=st.AAL1)
    auth = {"authorization": f"Bearer {token}"}
    assert http_request(env.address, "GET", "/v1/accounts/1/balance", auth).status == 200

    side.stop()
    a = http_request(env.address, "GET", "/v1/accounts/1/balance", auth)
    assert a.status == 503
    assert b"x-auth-subject" not in a.body
    code, _ = _balance(env.address, token)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert env.stat("http.ingress_http.ext_authz.error") >= 2
    assert env.stat("http.ingress_http.ext_authz.failure_mode_allowed") == 0

    side.start()  # same port: the ext_authz cluster is static
    deadline = time.monotonic() + 10
    while (status := http_request(env.address, "GET", "/v1/accounts/1/balance", auth).status) != 200:
        assert status == 503
        assert time.monotonic() < deadline, "Envoy did not recover"
        time.sleep(0.1)
    assert _balance(env.address, token)[0] == grpc.StatusCode.OK


@pytest.mark.parametrize(
    "config", sorted((st.ROOT / "examples").rglob("envoy*.yaml")), ids=lambda p: str(p.relative_to(st.ROOT))
)
def test_envoy_config_passes_validate_mode(config: Path) -> None:
    """`envoy --mode validate` accepts every Envoy config we ship (run from the repo root, as documented)."""
    r = subprocess.run(
        [
            str(st.ENVOY),
            "--mode",
            "validate",
            "-c",
            str(config.relative_to(st.ROOT)),
            "-l",
            "warn",
            "--use-dynamic-base-id",
        ],
        cwd=st.ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert "OK" in r.stdout
