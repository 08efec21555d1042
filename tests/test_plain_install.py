"""A plain `pip install` of the sidecar's wheel exports traces (the perf-and-tracing issue).

`xds-protos` (a build and test dependency only) used to be a run-time dependency, and its copy of
`opentelemetry/proto` overwrote opentelemetry-proto's: a plain install crashed at start with
`ImportError: InstrumentationScope` as soon as an OTLP endpoint was set. This test builds the
wheel, installs it with nothing but `pip install` into a fresh venv, starts `stepup-sidecar serve`
with OTEL_EXPORTER_OTLP_ENDPOINT pointing at a real OTLP receiver, and checks the span arrives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import grpc
import pytest

from examples.stack import free_port, wait_serving
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests.helpers import EXAMPLE_POLICY, ROOT, check_request
from tests.otlp_receiver import Receiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("plain")
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )
    (wheel,) = wheels.glob("stepup_sidecar-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # Nothing but pip install: no constraints, no repair step, no test extra.
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env_dir


def test_a_plain_install_has_no_xds_protos_and_a_working_otlp_exporter(plain_venv: Path) -> None:
    py = plain_venv / "bin" / "python"
    probe = subprocess.run(
        [str(py), "-c",
         "import importlib.util, sys\n"
         "import opentelemetry.exporter.otlp.proto.grpc.trace_exporter\n"
         "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope\n"
         "print(importlib.util.find_spec('envoy') is None)"],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True"  # xds-protos is not installed


def test_a_plain_install_exports_a_span_per_decision_to_a_real_receiver(plain_venv: Path, tmp_path: Path) -> None:
    receiver = Receiver()
    listen = f"127.0.0.1:{free_port()}"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STEPUP_", "PYTHON", "VIRTUAL_ENV"))
    }
    env |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    proc = subprocess.Popen(
        [str(plain_venv / "bin" / "stepup-sidecar"), "serve", "--policy", str(EXAMPLE_POLICY), "--listen", listen,
         "--decision-log", "off", "--watch-interval", "0"],
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_serving(listen, timeout=60)
        headers = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
        with grpc.insecure_channel(listen) as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            for _ in range(5):
                resp = stub.Check(check_request("/healthz", method="GET", grpc=False, headers=headers), timeout=5)
                assert resp.status.code == 0
        deadline = time.monotonic() + 20
        while len(receiver.spans) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        receiver.stop()
    assert "ImportError" not in err, err[-2000:]
    assert len(receiver.spans) == 5, err[-2000:]
    span = receiver.spans[0]
    assert span.name == "ext_authz.check" and span.trace_id.hex() == TRACE_ID
    attrs = receiver.attributes(span)
    assert attrs["authz.outcome"] == "allow" and attrs["authz.reason"] == "public"
