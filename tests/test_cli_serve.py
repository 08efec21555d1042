"""The `serve` command as a user runs it: start, answer, report health, stop cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from examples.stack import free_port, wait_serving
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests.helpers import EXAMPLE_POLICY, check_request


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    listen, health = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "STEPUP_POLICY": str(EXAMPLE_POLICY),
        "STEPUP_LISTEN": listen,
        "STEPUP_DECISION_LOG": "stdout",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--health-listen", health],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(listen)
        yield proc, listen, health
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_serve_answers_and_stops_cleanly_on_sigterm(sidecar: tuple[subprocess.Popen[str], str, str]) -> None:
    proc, listen, health = sidecar
    wait_serving(health)
    with grpc.insecure_channel(listen) as ch:
        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(
            check_request("/healthz", method="GET"), timeout=5
        )
    assert resp.status.code == 0
    # the health-only address carries no Check service
    with grpc.insecure_channel(health) as ch, pytest.raises(grpc.RpcError) as e:
        external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request("/healthz", method="GET"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert '"event":"decision"' in out and '"reason":"public"' in out
    assert "shutting down: health NOT_SERVING" in err and '"msg": "stopped"' in err


def test_serve_refuses_an_invalid_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nassurance: {levels: []}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--policy",
            str(bad),
            "--listen",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "the policy is invalid, not starting" in proc.stderr
    assert f"{bad}:2:21: assurance.levels: [] should be non-empty" in proc.stderr


def test_serve_without_policy_is_a_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "STEPUP_POLICY"}
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve"], capture_output=True, text=True, env=env, timeout=30
    )
    assert proc.returncode == 2 and "the following arguments are required: --policy" in proc.stderr
    assert "serve [-h] --policy POLICY" in proc.stderr  # shown as required in the usage line


def test_a_second_sidecar_on_the_same_port_fails_instead_of_sharing_it(
    sidecar: tuple[subprocess.Popen[str], str, str],
) -> None:
    _, listen, _ = sidecar
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(EXAMPLE_POLICY), "--listen", listen],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert f"cannot listen on {listen}" in proc.stderr


def test_request_content_never_reaches_the_operational_log(tmp_path: Path) -> None:
    """A client-sent `tracestate` that OpenTelemetry would log verbatim on a parse warning (and a
    hostile path, method and header) leave no trace in the sidecar's stderr; the decision log
    line carries only the fields it is made of."""
    listen = f"127.0.0.1:{free_port()}"
    secret = "s3cr3t-from-the-client"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(EXAMPLE_POLICY), "--listen", listen,
         "--watch-interval", "0", "--log-level", "debug"],
        env={**os.environ, "OTEL_TRACES_EXPORTER": "console"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(listen)
        with grpc.insecure_channel(listen) as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            headers = {
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "tracestate": f"bad key={secret},{secret}==,=={secret}",
                "baggage": f"{secret}=%%%",
                "x-note": secret,
            }
            for method, path in (("GET", "/healthz"), (f"G {secret}", "/healthz"), ("GET", f"/{secret}/../x")):
                resp = stub.Check(check_request(path, method=method, grpc=False, headers=headers), timeout=5)
                assert resp.status.code in (0, 3, 7)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert secret not in err, err[-2000:]
    decisions = [line for line in out.splitlines() if line.startswith('{"ts"')]
    assert len(decisions) == 3 and not any(secret in line for line in decisions)


def _serve_argv(policy: Path, listen: str) -> list[str]:
    return [
        sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", listen,
        "--decision-log", "off", "--watch-interval", "0",
    ]  # fmt: skip


def test_a_large_yaml_policy_is_parsed_in_a_child_at_start_up_and_decides(tmp_path: Path) -> None:
    """Past 1 MiB a YAML policy is parsed by the validator child while serve imports: what
    serves is that policy, rule for rule."""
    from bench.decide import generated_policy
    from sidecar import app

    path = generated_policy(20_000, tmp_path)
    assert path.stat().st_size > app.LARGE_YAML
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        _serve_argv(path, listen), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_serving(listen, timeout=60)
        with grpc.insecure_channel(listen) as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            # s9999/p9999 (the last generated pair): low, granted to role499; no token: a step-up.
            resp = stub.Check(check_request("/gen8.v1.Service9999/Get"), timeout=10)
            assert resp.status.code == 16  # UNAUTHENTICATED: the low level asks for a login
            resp = stub.Check(check_request("/gen8.v1.Service10000/Get"), timeout=10)
            assert resp.status.code == 7  # PERMISSION_DENIED: past the generated rules, no rule
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_large_broken_yaml_policy_is_refused_with_its_place(tmp_path: Path) -> None:
    """The child reports the problem; serve reads the file again itself for its line and column."""
    from bench.decide import generated_policy

    text = generated_policy(20_000, tmp_path).read_text()
    bad_rule = "    - {id: s5000, match: "
    assert bad_rule in text
    text = text.replace(bad_rule, "    - {id: s5000, level: nowhere, match: ", 1)
    bad = tmp_path / "big.yaml"
    bad.write_text(text)
    line = text[: text.index("    - {id: s5000, ")].count("\n") + 1
    proc = subprocess.run(
        _serve_argv(bad, f"127.0.0.1:{free_port()}"), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert "the policy is invalid, not starting" in proc.stderr
    assert f"{bad}:{line}:" in proc.stderr and "sensitivity.rules[5000]" in proc.stderr, proc.stderr
