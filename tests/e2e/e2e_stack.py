"""Process harness for the end-to-end tests: the sidecar, the demo bank upstream and Envoy, each on
loopback ports chosen at run time, each in its own process group so that stopping it stops
everything it spawned.

Plain functions and small classes (no pytest here) so that `tests/test_grpcurl.py` can reuse them.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from joserfc import jwt
from joserfc.jwk import import_key

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENVOY = BIN / "envoy"
GRPCURL = BIN / "grpcurl"
POLICY = ROOT / "examples" / "policy.yaml"
ENVOY_YAML = ROOT / "examples" / "envoy" / "envoy.yaml"
ENVOY_JWT_YAML = ROOT / "examples" / "envoy" / "envoy-jwt-authn.yaml"
DEV_JWKS = ROOT / "examples" / "keys" / "dev-jwks.json"
DEV_PRIVATE_JWK = ROOT / "examples" / "keys" / "dev-private-jwk.json"
ISSUER = "https://idp.example.test"
AUDIENCE = "bank-api"

# The example policy's acr strings, one per assurance level.
AAL1 = "urn:okta:loa:1fa:any"
AAL2 = "urn:okta:loa:2fa:any"
AAL2_PHR = "phr"
AAL3 = "phrh"

START_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that cannot report a bound port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- tokens -----------------------------------------------------------------------------------

_KEY_DATA = json.loads(DEV_PRIVATE_JWK.read_text())
_KEY = import_key(_KEY_DATA)


def mint(
    sub: str = "alice",
    *,
    roles: tuple[str, ...] = ("teller",),
    scope: str = "payments",
    acr: str | None = AAL2_PHR,
    amr: tuple[str, ...] = ("pwd", "hwk"),
    auth_age: int = 0,
    ttl: int = 600,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    key: Any = None,
) -> str:
    """A token signed with the example development key (what `stepup-sidecar dev-token` makes)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "iat": now,
        "exp": now + ttl,
        "auth_time": now - auth_age,
        "roles": list(roles),
        "amr": list(amr),
    }
    if scope:
        claims["scope"] = scope
    if acr is not None:
        claims["acr"] = acr
    header = {"alg": _KEY_DATA.get("alg", "RS256"), "kid": _KEY_DATA["kid"], "typ": "JWT"}
    return jwt.encode(header, claims, key or _KEY)


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process in its own session (process group) with stdout/stderr in files."""

    name: str
    argv: list[str]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"{self.name}.out"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"{self.name}.err"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = self.stdout_path.open("ab")
        err = self.stderr_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
            err.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after `grace` seconds. Idempotent."""
        p = self.popen
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
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

    def fail(self, what: str) -> AssertionError:
        return AssertionError(f"{self.name}: {what}\n--- stderr ---\n{self.stderr()[-4000:]}")


def _wait(cond: Any, proc: Proc, what: str, timeout: float = START_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise proc.fail(f"exited (code {proc.popen.returncode if proc.popen else '?'}) before {what}")
        result = cond()
        if result:
            return result
        time.sleep(0.05)
    raise proc.fail(f"not {what} within {timeout}s")


# -- the sidecar --------------------------------------------------------------------------------


@dataclass
class Sidecar:
    proc: Proc
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serving(self) -> bool:
        try:
            with grpc.insecure_channel(self.address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=0.5
                )
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def start(self) -> Sidecar:
        self.proc.start()
        _wait(self.serving, self.proc, "SERVING on grpc.health.v1")
        return self

    def stop(self) -> None:
        self.proc.stop()

    def decisions(self) -> list[dict[str, Any]]:
        """Decision log lines (the sidecar is started with --decision-log stderr)."""
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
        text, dec, spans, i = self.proc.stdout(), json.JSONDecoder(), [], 0
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
    workdir: Path, name: str = "sidecar", port: int | None = None, *, console_spans: bool = True
) -> Sidecar:
    """A not-yet-started sidecar serving the example policy, decision log on stderr."""
    port = port or free_port()
    env = {"PYTHONUNBUFFERED": "1"}
    if console_spans:
        env |= {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    else:
        env |= {"OTEL_TRACES_EXPORTER": "none"}
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--policy",
        str(POLICY),
        "--listen",
        f"127.0.0.1:{port}",
        "--decision-log",
        "stderr",
        "--watch-interval",
        "0",
        "--shutdown-grace",
        "0.5",
        "--log-level",
        "warning",
    ]
    return Sidecar(Proc(name, argv, workdir, env), port)


# -- the bank upstream --------------------------------------------------------------------------


@dataclass
class Bank:
    proc: Proc
    grpc_port: int = 0
    http_port: int = 0

    def start(self) -> Bank:
        self.proc.start()
        line = _wait(lambda: self.proc.stdout().partition("\n")[1] and self.proc.stdout(), self.proc, "ready")
        ports = json.loads(line.splitlines()[0])
        self.grpc_port, self.http_port = ports["grpc_port"], ports["http_port"]
        return self

    def stop(self) -> None:
        self.proc.stop()


def new_bank(workdir: Path) -> Bank:
    argv = [
        sys.executable,
        str(ROOT / "examples" / "bank_server.py"),
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]
    return Bank(Proc("bank", argv, workdir, {"PYTHONUNBUFFERED": "1"}))


# -- Envoy ------------------------------------------------------------------------------------


def envoy_config(src: Path, *, ext_authz: int, bank_upstream: int, http_upstream: int) -> dict[str, Any]:
    """The example bootstrap with its fixed ports replaced: admin and listener on port 0 (Envoy
    picks; read back from the admin API), clusters pointing at the given ports; the jwt_authn
    JWKS file made absolute."""
    doc = yaml.safe_load(src.read_text())
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
        (ep,) = [e for group in clusters[name]["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
        ep["endpoint"]["address"]["socket_address"]["port_value"] = port
    for li in res["listeners"]:
        for chain in li["filter_chains"]:
            for f in chain["filters"]:
                for hf in f["typed_config"].get("http_filters", []):
                    if hf["name"] == "envoy.filters.http.jwt_authn":
                        for provider in hf["typed_config"]["providers"].values():
                            provider["local_jwks"]["filename"] = str(DEV_JWKS)
    return doc


@dataclass
class Envoy:
    proc: Proc
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

    def _ready(self) -> bool:
        if not self.admin_port:
            text = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
            if not text:
                return False
            self.admin_port = int(text.rpartition(":")[2])
        try:
            return self.admin("/ready").strip() == "LIVE"
        except OSError:
            return False

    def start(self) -> Envoy:
        self.proc.start()
        _wait(self._ready, self.proc, "LIVE on /ready")
        listeners = json.loads(self.admin("/listeners?format=json"))
        (status,) = [s for s in listeners["listener_statuses"] if s["name"] == "ingress"]
        self.port = int(status["local_address"]["socket_address"]["port_value"])
        return self

    def stop(self) -> None:
        self.proc.stop()

    def stat(self, name: str) -> int:
        """One counter from the admin API; KeyError when Envoy has no such stat."""
        for line in self.admin(f"/stats?filter=^{re.escape(name)}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise KeyError(name)


def new_envoy(workdir: Path, src: Path, name: str, *, ext_authz: int, upstream: Bank) -> Envoy:
    """A not-yet-started Envoy for `src` (one of examples/envoy/*.yaml)."""
    cfg = envoy_config(
        src, ext_authz=ext_authz, bank_upstream=upstream.grpc_port, http_upstream=upstream.http_port
    )
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    admin_path = workdir / f"{name}.admin"
    argv = [
        str(ENVOY),
        "-c",
        str(cfg_path),
        "-l",
        "warn",
        "--use-dynamic-base-id",
        "--admin-address-path",
        str(admin_path),
        "--concurrency",
        "1",
    ]
    return Envoy(Proc(name, argv, workdir), admin_path)


@contextlib.contextmanager
def running(*items: Any) -> Iterator[None]:
    """Stop the given started items (in reverse order), whatever happens."""
    try:
        yield
    finally:
        for item in reversed(items):
            item.stop()
