"""Two sidecar workers behind a real Envoy: the example config lists one ext_authz endpoint per
worker and Envoy balances the Checks per request across them (the perf issue's workers)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import e2e_stack as st
import pytest
from e2e_helpers import http_request

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[st.Envoy, st.Sidecar]]:
    workdir = tmp_path_factory.mktemp("workers")
    sidecar = st.new_sidecar(workdir, "sidecar-2w", workers=2, console_spans=False)
    bank = st.new_bank(workdir, "bank-2w")
    with st.running(sidecar, bank):
        sidecar.start()
        bank.start()
        envoy = st.new_envoy(workdir, st.ENVOY_YAML, "envoy-2w", ext_authz=sidecar.port, upstream=bank)
        with st.running(envoy):
            envoy.start()
            yield envoy, sidecar


def _checks_per_worker(envoy: st.Envoy, sidecar: st.Sidecar) -> dict[int, int]:
    """Requests Envoy sent to each ext_authz endpoint (its /clusters admin page, per host)."""
    out: dict[int, int] = {}
    for line in envoy.admin("/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "ext_authz" and parts[2] == "rq_total":
            out[int(parts[1].rpartition(":")[2])] = int(parts[3])
    return out


def test_envoy_balances_checks_across_both_workers(two_workers: tuple[st.Envoy, st.Sidecar]) -> None:
    envoy, sidecar = two_workers
    deadline = time.monotonic() + 10  # the health check admits the second worker
    ports = {sidecar.port, sidecar.port + 1}
    answers = 0
    while answers < 40 or (time.monotonic() < deadline and min(_checks_per_worker(envoy, sidecar).values(), default=0) == 0):
        r = http_request(envoy.address, "GET", "/healthz")
        assert r.status == 200
        seen = json.loads(r.body)["headers"]
        (decision_id,) = seen["x-auth-decision-id"]  # the sidecar answered (allowed, public)
        assert len(decision_id) == 16
        answers += 1
    per_worker = _checks_per_worker(envoy, sidecar)
    assert set(per_worker) == ports, per_worker
    assert all(n > 0 for n in per_worker.values()), per_worker
    assert envoy.stat("cluster.ext_authz.health_check.healthy") == 2


def test_a_missing_worker_is_taken_out_of_rotation(tmp_path: Path) -> None:
    """The example config lists two endpoints; with one worker, the health check keeps Envoy off
    the empty port: every request is still answered by the sidecar."""
    sidecar = st.new_sidecar(tmp_path, "sidecar-1w", workers=1, console_spans=False)
    bank = st.new_bank(tmp_path, "bank-1w")
    with st.running(sidecar, bank):
        sidecar.start()
        bank.start()
        envoy = st.new_envoy(tmp_path, st.ENVOY_YAML, "envoy-1w", ext_authz=sidecar.port, upstream=bank)
        with st.running(envoy):
            envoy.start()
            time.sleep(1.5)
            for _ in range(20):
                assert http_request(envoy.address, "GET", "/healthz").status == 200
            assert envoy.stat("cluster.ext_authz.health_check.healthy") == 1
