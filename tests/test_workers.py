"""`serve --workers N`: worker i answers on the --listen port + i; one scrape counts every worker's
decisions; health is SERVING only while every worker is; SIGHUP reloads every worker; a worker that
dies is restarted; SIGTERM drains them all and the supervisor exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from examples.stack import health_status, wait_serving
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests.helpers import check_request, example_policy_text

LEVEL = 'match: ["/bank.v1.Payments/Transfer", "POST /v1/transfers"], level: high'


def _free_block(n: int) -> int:
    """A port p such that p .. p+n-1 were all free a moment ago."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


def _sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def _check(address: str, req: object) -> tuple[int, str]:
    with grpc.insecure_channel(address) as ch:
        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)
    return resp.status.code, resp.status.message


def test_two_workers_on_their_own_ports(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text())
    base, health, metrics = _free_block(2), _free_block(1), _free_block(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", f"127.0.0.1:{base}",
         "--workers", "2", "--health-listen", f"127.0.0.1:{health}", "--metrics-listen", f"127.0.0.1:{metrics}",
         "--watch-interval", "0", "--drain-delay", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )
    try:
        for port in (base, base + 1):
            wait_serving(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 10
        while health_status(f"127.0.0.1:{health}") != 1:
            assert time.monotonic() < deadline, "aggregate health never SERVING"
            time.sleep(0.1)
        transfer = check_request("/v1/transfers", method="POST", grpc=False)
        for port in (base, base + 1):
            for _ in range(3):
                assert _check(f"127.0.0.1:{port}", transfer) == (16, "missing_credential")
        deadline = time.monotonic() + 5  # a worker writes its counts every half second
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                text = r.read().decode()
            if _sample(text, "stepup_decisions_total") >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert _sample(text, "stepup_decisions_total") == 6  # one scrape, both workers
        assert _sample(text, "stepup_decisions_by_sensitivity_total") == 6
        infos = [x for x in text.splitlines() if x.startswith("stepup_policy_info{") and x.endswith(" 1.0")]
        assert len(infos) == 1 and 'role="active"' in infos[0] and 'name="bank-demo"' in infos[0], text
        for path, want in (("/healthz", 200), ("/readyz", 200)):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}{path}", timeout=5) as r:
                assert r.status == want

        # SIGHUP reloads every worker.
        policy.write_text(example_policy_text((LEVEL, LEVEL.replace("level: high", "level: public"))))
        proc.send_signal(signal.SIGHUP)
        for port in (base, base + 1):
            deadline = time.monotonic() + 30
            while _check(f"127.0.0.1:{port}", transfer) != (0, ""):
                assert time.monotonic() < deadline, f"worker on {port} never reloaded"
                time.sleep(0.2)

        # A worker that dies is restarted; meanwhile the aggregate health is not SERVING.
        pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(pids) == 2
        os.kill(int(pids[1]), signal.SIGKILL)
        seen_not_serving = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = health_status(f"127.0.0.1:{health}")
            seen_not_serving = seen_not_serving or status != 1
            if seen_not_serving and status == 1:
                break
            time.sleep(0.05)
        assert seen_not_serving and health_status(f"127.0.0.1:{health}") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=5) as r:
            assert r.status == 200  # ready again with both workers
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        infos = [x for x in text.splitlines() if x.startswith("stepup_policy_info{") and x.endswith(" 1.0")]
        assert len(infos) == 1, infos  # the dead worker's gauge left with it; one policy loaded
        for port in (base, base + 1):
            wait_serving(f"127.0.0.1:{port}")
            assert _check(f"127.0.0.1:{port}", transfer) == (0, "")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "restarting" in err
    lines = [line for line in out.splitlines() if line]
    assert all(line.startswith('{"ts":') and line.endswith("}") for line in lines)  # no torn lines
    assert len(lines) >= 6


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text())
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", "127.0.0.1:0", "--workers", "2"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "--workers needs a fixed --listen port" in proc.stderr


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_must_be_positive(tmp_path: Path, workers: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--policy", "x", "--workers", workers],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "--workers" in proc.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--listen", "127.0.0.1:65535", "--workers", "2"], "need ports up to 65536 (above 65535)"),
        (["--listen", "127.0.0.1:19000", "--workers", "3", "--health-listen", "127.0.0.1:19002"],
         "--health-listen 127.0.0.1:19002 is one of the workers' ports (19000-19002)"),
        (["--listen", "127.0.0.1:19000", "--workers", "2", "--metrics-listen", "127.0.0.1:19001"],
         "--metrics-listen 127.0.0.1:19001 is one of the workers' ports (19000-19001)"),
    ],
)
def test_workers_ports_must_not_collide(tmp_path: Path, extra: list[str], message: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text())
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), *extra],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _sighup_handled(pid: int) -> bool:
    """Whether SIGHUP is ignored or caught by the process (from /proc), i.e. it no longer kills it."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = {k: int(v, 16) for k, v in (line.split(":\t") for line in status.splitlines() if line[:6] in ("SigIgn", "SigCgt"))}
    return any(m & (1 << (signal.SIGHUP - 1)) for m in masks.values())


def test_sighup_while_starting_does_not_end_serve(tmp_path: Path) -> None:
    """An operator's (or a ConfigMap tool's) SIGHUP that arrives while the policy is still loading
    must not kill the process: from the moment serve() runs, SIGHUP is ignored until the reload
    handler takes over."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text())
    port = _free_block(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", f"127.0.0.1:{port}",
         "--watch-interval", "0", "--drain-delay", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not _sighup_handled(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGHUP)
        wait_serving(f"127.0.0.1:{port}")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_end_with_a_killed_supervisor(tmp_path: Path) -> None:
    """SIGKILL of the supervisor (an OOM kill, say) must not leave workers serving unsupervised."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text())
    base, health = _free_block(2), _free_block(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", f"127.0.0.1:{base}",
         "--workers", "2", "--health-listen", f"127.0.0.1:{health}", "--watch-interval", "0", "--drain-delay", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for port in (base, base + 1):
            wait_serving(f"127.0.0.1:{port}")
        pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their supervisor"
