"""Start and stop the local stack: the sidecar (examples/policy.yaml), the demo bank upstream
(examples/bank_server.py) and a real Envoy (examples/envoy/*.yaml with its ports rewritten), all on
loopback ports chosen at run time.

Each process runs in its own session (process group): Ctrl-C reaches only the caller, and stopping
a process stops everything it spawned. Every `start()` waits until the process is ready (the sidecar
SERVING on grpc.health.v1, the bank reporting its ports, Envoy LIVE with its listener bound).

Used by examples/demo.py and by the end-to-end tests (tests/e2e); plain code, no pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENVOY = BIN / "envoy"
POLICY = ROOT / "examples" / "policy.yaml"
ENVOY_YAML = ROOT / "examples" / "envoy" / "envoy.yaml"
ENVOY_JWT_YAML = ROOT / "examples" / "envoy" / "envoy-jwt-authn.yaml"
DEV_JWKS = ROOT / "examples" / "keys" / "dev-jwks.json"

START_TIMEOUT = 20.0

T = TypeVar("T")


class StackError(RuntimeError):
    """A process exited or did not become ready; the message ends with its stderr."""


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that cannot report a bound port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> int:
    """A port p such that p .. p+n-1 were all free a moment ago (for `serve --workers n`, and for
    the Envoy configs' one endpoint per worker)."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        held = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise StackError(f"no block of {n} free ports")


def health_status(address: str, service: str = "", timeout: float = 0.5) -> int:
    """grpc.health.v1 Check, as a kubelet gRPC probe asks it: the status, or -1 if unreachable."""
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return -1
    return int(resp.status)


def wait_serving(address: str, timeout: float = 30.0, service: str = "") -> None:
    """Block until `address` reports SERVING; StackError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(address, service) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.1)
    raise StackError(f"{address} never became SERVING")


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process in its own session (process group) with stdout/stderr in files."""

    name: str
    argv: list[str]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    _signalled: bool = field(default=False, repr=False)

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"{self.name}.out"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"{self.name}.err"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the caller only; the caller stops us
            )
        self._signalled = False

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self) -> None:
        """SIGTERM the whole process group (once) without waiting."""
        if self.popen is not None and not self._signalled:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            self._signalled = True

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after `grace` seconds. Idempotent."""
        p = self.popen
        if p is None:
            return
        self.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        # Anything left in the group (it should be empty) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        self.popen = None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def fail(self, what: str) -> StackError:
        return StackError(f"{self.name}: {what}\n--- stderr ---\n{self.stderr()[-4000:]}")

    def wait_for(self, cond: Callable[[], T], what: str, timeout: float = START_TIMEOUT) -> T:
        """Poll `cond` until it returns something true (returned); fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail(f"exited (code {self.popen.returncode if self.popen else '?'}) before {what}")
            result = cond()
            if result:
                return result
            time.sleep(0.05)
        raise self.fail(f"not {what} within {timeout}s")


@dataclass
class Service:
    """One process of the stack: `launch()` returns at once, `wait_ready()` blocks, `start()` does both."""

    proc: Proc

    def launch(self) -> None:
        self.proc.start()

    def wait_ready(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self.launch()
        self.wait_ready()
        return self

    def stop(self) -> None:
        self.proc.stop()


def stop_all(*services: Service) -> None:
    """Signal every process first, then wait for each (in reverse order): they shut down together."""
    for s in reversed(services):
        s.proc.terminate()
    for s in reversed(services):
        s.stop()


@contextlib.contextmanager
def running(*services: Service) -> Iterator[None]:
    """Stop the given services (started or not) on the way out, whatever happens."""
    try:
        yield
    finally:
        stop_all(*services)


# -- the sidecar --------------------------------------------------------------------------------


@dataclass
class Sidecar(Service):
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serving(self) -> bool:
        return health_status(self.address) == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self) -> None:
        self.proc.wait_for(self.serving, "SERVING on grpc.health.v1")

    def decisions(self) -> list[dict[str, Any]]:
        """Decision log lines (when started with --decision-log stderr)."""
        out = []
        for line in self.proc.stderr().splitlines():
            if line.startswith("{") and '"event":"decision"' in line:
                out.append(json.loads(line))
        return out

    def decision(self, decision_id: str, timeout: float = 3.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [d for d in self.decisions() if d.get("decision_id") == decision_id]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no decision log line for {decision_id}")
            time.sleep(0.1)

    def spans(self) -> list[dict[str, Any]]:
        """Spans written by OTEL_TRACES_EXPORTER=console (concatenated JSON documents on stdout)."""
        text, dec, i = self.proc.stdout(), json.JSONDecoder(), 0
        spans: list[dict[str, Any]] = []
        while True:
            i = text.find("{", i)
            if i < 0:
                return spans
            try:
                doc, i = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                return spans  # a document still being written
            if isinstance(doc, dict) and "context" in doc:
                spans.append(doc)


def new_sidecar(
    workdir: Path,
    name: str = "sidecar",
    port: int | None = None,
    *,
    console_spans: bool | None = True,
    decision_log: bool = True,
    policy: Path = POLICY,
    workers: int = 1,
) -> Sidecar:
    """A not-yet-started sidecar serving `policy`. Spans: True writes them as JSON on stdout,
    False turns tracing off, None leaves it to the caller's OTEL_* environment. With
    `decision_log` the decision log goes to stderr. With `workers` > 1, worker i is on port + i."""
    port = port or free_ports(max(workers, 2))
    env = {"PYTHONUNBUFFERED": "1"}
    if console_spans:
        env |= {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    elif console_spans is False:
        env |= {"OTEL_TRACES_EXPORTER": "none"}
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--policy",
        str(policy),
        "--listen",
        f"127.0.0.1:{port}",
        *(["--decision-log", "stderr"] if decision_log else []),
        "--watch-interval",
        "0",
        "--shutdown-grace",
        "0.5",
        "--log-level",
        "warning",
        "--workers",
        str(workers),
    ]
    return Sidecar(Proc(name, argv, workdir, env), port)


# -- the bank upstream --------------------------------------------------------------------------


@dataclass
class Bank(Service):
    grpc_port: int = 0
    http_port: int = 0

    def wait_ready(self) -> None:
        # examples/bank_server.py prints {"grpc_port": ..., "http_port": ...} once it listens.
        line = self.proc.wait_for(
            lambda: self.proc.stdout().partition("\n")[1] and self.proc.stdout(), "ready"
        )
        ports = json.loads(line.splitlines()[0])
        self.grpc_port, self.http_port = ports["grpc_port"], ports["http_port"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def new_bank(workdir: Path, name: str = "bank") -> Bank:
    argv = [
        sys.executable,
        str(ROOT / "examples" / "bank_server.py"),
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]
    return Bank(Proc(name, argv, workdir, {"PYTHONUNBUFFERED": "1"}))


# -- Envoy ------------------------------------------------------------------------------------


def envoy_config(src: Path, *, ext_authz: int, bank_upstream: int, http_upstream: int) -> dict[str, Any]:
    """The example bootstrap with its fixed ports replaced: admin and listener on port 0 (Envoy
    picks; read back from the admin API), clusters pointing at the given ports; the jwt_authn
    JWKS file made absolute."""
    doc: dict[str, Any] = yaml.safe_load(src.read_text())
    doc["admin"]["address"]["socket_address"]["port_value"] = 0
    res = doc["static_resources"]
    listeners = {li["name"]: li for li in res["listeners"]}
    listeners["ingress"]["address"]["socket_address"]["port_value"] = 0
    clusters = {c["name"]: c for c in res["clusters"]}
    for name, port in (
        ("ext_authz", ext_authz),
        ("bank_upstream", bank_upstream),
        ("http_upstream", http_upstream),
    ):
        # ext_authz lists one endpoint per sidecar worker: worker i on ext_authz + i.
        eps = [e for group in clusters[name]["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
        for i, ep in enumerate(eps):
            ep["endpoint"]["address"]["socket_address"]["port_value"] = port + i
    for li in res["listeners"]:
        for chain in li["filter_chains"]:
            for f in chain["filters"]:
                for hf in f["typed_config"].get("http_filters", []):
                    if hf["name"] == "envoy.filters.http.jwt_authn":
                        for provider in hf["typed_config"]["providers"].values():
                            provider["local_jwks"]["filename"] = str(DEV_JWKS)
    return doc


@dataclass
class Envoy(Service):
    admin_path: Path
    admin_port: int = 0
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as r:
            return str(r.read().decode())

    def _live(self) -> bool:
        if not self.admin_port:
            text = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
            if not text:
                return False
            self.admin_port = int(text.rpartition(":")[2])
        try:
            return self.admin("/ready").strip() == "LIVE"
        except OSError:
            return False

    def wait_ready(self) -> None:
        self.proc.wait_for(self._live, "LIVE on /ready")
        listeners = json.loads(self.admin("/listeners?format=json"))
        (status,) = [s for s in listeners["listener_statuses"] if s["name"] == "ingress"]
        self.port = int(status["local_address"]["socket_address"]["port_value"])

    def stat(self, name: str) -> int:
        """One counter from the admin API; KeyError when Envoy has no such stat."""
        for line in self.admin(f"/stats?filter=^{re.escape(name)}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise KeyError(name)


def new_envoy(
    workdir: Path,
    src: Path,
    name: str,
    *,
    ext_authz: int,
    upstream: Bank,
    binary: Path | str = ENVOY,
) -> Envoy:
    """A not-yet-started Envoy for `src` (one of examples/envoy/*.yaml) in front of a started bank."""
    cfg = envoy_config(
        src, ext_authz=ext_authz, bank_upstream=upstream.grpc_port, http_upstream=upstream.http_port
    )
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    admin_path = workdir / f"{name}.admin"
    argv = [
        str(binary),
        "-c",
        str(cfg_path),
        "-l",
        "warn",
        "--use-dynamic-base-id",
        "--admin-address-path",
        str(admin_path),
        "--concurrency",
        "1",
        "--file-flush-interval-msec",  # access log lines appear within 0.2 s, not Envoy's default 10 s
        "200",
    ]
    return Envoy(Proc(name, argv, workdir), admin_path)


# -- all three ----------------------------------------------------------------------------------


@dataclass
class Stack:
    sidecar: Sidecar
    bank: Bank
    envoy: Envoy


@contextlib.contextmanager
def stack(
    workdir: Path,
    *,
    envoy_yaml: Path = ENVOY_YAML,
    envoy_bin: Path | str = ENVOY,
    console_spans: bool | None = True,
    decision_log: bool = True,
) -> Iterator[Stack]:
    """Start the sidecar and the bank side by side, then Envoy in front of them; yield the three
    (ready); stop them all on the way out, also when starting fails or on Ctrl-C."""
    sidecar = new_sidecar(workdir, console_spans=console_spans, decision_log=decision_log)
    bank = new_bank(workdir)
    services: list[Service] = [sidecar, bank]
    try:
        sidecar.launch()
        bank.launch()
        bank.wait_ready()
        sidecar.wait_ready()
        envoy = new_envoy(
            workdir, envoy_yaml, "envoy", ext_authz=sidecar.port, upstream=bank, binary=envoy_bin
        )
        services.append(envoy)
        envoy.start()
        yield Stack(sidecar, bank, envoy)
    finally:
        stop_all(*services)
