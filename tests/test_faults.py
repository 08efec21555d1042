"""Faults: a policy swapped under load, SIGTERM under load, the trace collector down, a slow JWKS URL.

Each test states what must still hold: every answer is a right answer, nothing fails, health says
NOT_SERVING before the server goes away, and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from joserfc.jwk import RSAKey, import_key

from examples.stack import free_port, wait_serving
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from sidecar.compiler import load_policy, load_policy_text
from sidecar.keys import RemoteKeys
from sidecar.runtime import PolicyWatcher
from tests.helpers import ACR_PHRH, EXAMPLE_POLICY, PRIVATE_JWK, check_request, make_token
from tests.test_server import Running

TRANSFER = "/bank.v1.Payments/Transfer"
BALANCE = "/bank.v1.Accounts/GetBalance"
ADMIN = "/bank.v1.Admin/SetPermissions"
DEV_KEY = import_key(PRIVATE_JWK)
CHECK = "/envoy.service.auth.v3.Authorization/Check"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- policy replaced under load ------------------------------------------------------------------


def _policy_texts() -> tuple[str, str]:
    """A: the example. B: transfers are only `low`, and tellers may no longer read balances."""
    doc = yaml.safe_load(EXAMPLE_POLICY.read_text())
    doc["issuers"][0]["jwks_file"] = str(EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json")
    a = yaml.safe_dump(doc)
    for rule in doc["sensitivity"]["rules"]:
        if rule["id"] == "transfer":
            rule["level"] = "low"
    for perm in doc["permissions"]:
        if perm["id"] == "tellers-read":
            perm["allow"]["roles"] = ["customer"]
    return a, yaml.safe_dump(doc)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_policy_swapped_under_load_gives_only_right_answers(tmp_path: Path) -> None:
    """While the watcher swaps two valid policies back and forth under concurrent Checks, every
    answer is the right answer under one of the two, and none fails."""
    text_a, text_b = _policy_texts()
    path = tmp_path / "policy.yaml"
    path.write_text(text_a)
    srv = Running()
    try:
        srv.runtime.swap(load_policy(path))
        watcher = PolicyWatcher(path, srv.runtime, interval=0.01)
        watching = asyncio.run_coroutine_threadsafe(watcher.run(), srv.loop)
        teller = make_token()
        # request -> the (status code, reason) each policy gives
        cases = [
            (check_request(TRANSFER, token=teller), {(16, "acr_too_low"), (0, "")}),
            (check_request(BALANCE, token=teller), {(0, ""), (7, "permission_denied")}),
            (check_request(ADMIN, token=make_token(acr=ACR_PHRH)), {(7, "permission_denied")}),
            (check_request("/healthz", method="GET", grpc=False), {(0, "")}),
        ]
        stop = threading.Event()
        seen: dict[int, set[tuple[int, str]]] = {i: set() for i in range(len(cases))}
        wrong: list[Any] = []
        calls = [0]

        def client(n: int) -> None:
            stub = external_auth_pb2_grpc.AuthorizationStub(srv.channel)
            i = n
            while not stop.is_set():
                req, allowed = cases[i % len(cases)]
                resp = stub.Check(req, timeout=5)  # an RPC error fails the test
                got = (resp.status.code, resp.status.message)
                seen[i % len(cases)].add(got)
                if got not in allowed:
                    wrong.append((i % len(cases), got))
                calls[0] += 1
                i += 1

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, n) for n in range(6)]
            for k in range(10):  # each reload validates in a child process (~0.5 s)
                _write_atomically(path, text_b if k % 2 == 0 else text_a)
                time.sleep(0.7)
            stop.set()
            for f in futures:
                f.result()
        watching.cancel()
        applied = srv.metrics.registry.get_sample_value("stepup_policy_reloads_total", {"result": "applied"})
        assert not wrong
        assert applied is not None and applied >= 5
        assert seen[0] == {(16, "acr_too_low"), (0, "")}  # both policies really answered
        assert srv.metrics.registry.get_sample_value("stepup_internal_errors_total") == 0
        assert calls[0] > 200
    finally:
        srv.stop()


# --- subprocess helpers -------------------------------------------------------------------------


class Sidecar:
    """`python -m sidecar serve` on free ports."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.listen = f"127.0.0.1:{free_port()}"
        self.health = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--policy",
                str(EXAMPLE_POLICY),
                "--listen",
                self.listen,
                "--health-listen",
                self.health,
                "--decision-log",
                "off",
                "--watch-interval",
                "0",
                *extra,
            ],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_serving(self.listen)

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=20)
        return err


# The load: requests with the answer each must get (status code, reason).
def load_mix() -> list[tuple[bytes, tuple[int, str]]]:
    now = int(time.time())
    teller = make_token(now=now, key=DEV_KEY)
    strong = make_token(now=now, key=DEV_KEY, acr="phr")
    mix = [
        (check_request(BALANCE, token=teller), (0, "")),
        (check_request(TRANSFER, token=strong), (0, "")),
        (check_request(TRANSFER, token=teller), (16, "acr_too_low")),
        (check_request(ADMIN, token=strong), (7, "permission_denied")),
        (check_request(BALANCE, token="not.a.jwt"), (16, "malformed_token")),
        (check_request("/v1/accounts/7/balance", method="GET", grpc=False, token=teller), (0, "")),
    ]
    return [(req.SerializeToString(), want) for req, want in mix]


async def _hammer(
    address: str, stop: asyncio.Event, concurrency: int, results: list[tuple[float, float, Any]]
) -> None:
    """Concurrent Checks until `stop`; records (start, end, (code, reason) or an RpcError code)."""
    mix = load_mix()
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(CHECK, request_serializer=None, response_deserializer=None)

        async def worker(n: int) -> None:
            i = n
            while not stop.is_set():
                body, want = mix[i % len(mix)]
                i += 1
                t0 = time.monotonic()
                try:
                    raw = await call(body, timeout=10)
                except grpc.aio.AioRpcError as e:
                    results.append((t0, time.monotonic(), e.code()))
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        return
                    continue
                resp = external_auth_pb2.CheckResponse.FromString(raw)
                got = (resp.status.code, resp.status.message if resp.status.code else "")
                results.append((t0, time.monotonic(), "ok" if got == want else ("wrong", got, want)))

        await asyncio.gather(*(worker(n) for n in range(concurrency)))


# --- SIGTERM under load ---------------------------------------------------------------------------


def test_sigterm_reports_not_serving_and_finishes_started_calls() -> None:
    """SIGTERM under load: health turns NOT_SERVING while the server still finishes the calls it
    has started (a call whose request body arrives only after the signal completes with the right
    answer); load calls see right answers or, once refused, UNAVAILABLE; the process exits 0."""
    sc = Sidecar("--shutdown-grace", "5")
    try:
        results = asyncio.run(_sigterm_scenario(sc, concurrency=4))
        assert sc.proc.wait(timeout=15) == 0
    finally:
        err = sc.close()
    assert "shutting down: health NOT_SERVING" in err
    _, calls = results
    assert sum(1 for c in calls if c[2] == "ok") > 100
    assert not [c for c in calls if isinstance(c[2], tuple)]  # no wrong answer
    assert all(c[2] in ("ok", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) for c in calls)


def test_sigterm_under_saturating_load_fails_no_call_sent_before_it() -> None:
    """No call that reached the sidecar before SIGTERM fails: Envoy would apply status_on_error.
    STEPUP_DRAIN_DELAY keeps answering while health says NOT_SERVING."""
    sc = Sidecar("--shutdown-grace", "5", env={"STEPUP_DRAIN_DELAY": "1"})
    try:
        t_term, calls = asyncio.run(_sigterm_scenario(sc, concurrency=32))
        sc.proc.wait(timeout=15)
    finally:
        sc.close()
    failed_before = [c for c in calls if c[0] < t_term and c[2] != "ok"]
    assert not failed_before, failed_before[:3]


async def _sigterm_scenario(sc: Sidecar, concurrency: int) -> tuple[float, list[tuple[float, float, Any]]]:
    results: list[tuple[float, float, Any]] = []
    stop = asyncio.Event()
    load = asyncio.ensure_future(_hammer(sc.listen, stop, concurrency, results))
    release = asyncio.Event()
    teller_body, _ = load_mix()[0]
    async with grpc.aio.insecure_channel(sc.listen) as ch, grpc.aio.insecure_channel(sc.health) as hch:
        # Calls the server has started (headers received) whose request body is still to come.
        slow_call = ch.stream_unary(CHECK, request_serializer=None, response_deserializer=None)

        async def body_later() -> Any:
            await release.wait()
            yield teller_body

        slow = [asyncio.ensure_future(slow_call(body_later(), timeout=20)) for _ in range(3)]
        health = health_pb2_grpc.HealthStub(hch)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=2)).status == 1
        await asyncio.sleep(0.5)
        t_term = time.monotonic()
        sc.proc.send_signal(signal.SIGTERM)
        observed: list[Any] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status
            except grpc.aio.AioRpcError as e:
                observed.append(e.code())
                break
            observed.append(status)
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.005)
        assert observed[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, observed
        assert not any(f.done() for f in slow)  # the server is draining, not gone
        stop.set()
        release.set()
        for f in slow:
            resp = external_auth_pb2.CheckResponse.FromString(await f)
            assert resp.status.code == 0  # finished, with the right answer
        await load
    return t_term, results


# --- the trace collector is down ----------------------------------------------------------------


def test_collector_down_decisions_keep_flowing_with_bounded_memory() -> None:
    """OTLP export to a closed port with a small span queue: no failed or wrong decision, and the
    sidecar's memory does not grow with the number of spans it could not send."""
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_BSP_MAX_QUEUE_SIZE": "64",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    metrics_port = free_port()
    sc = Sidecar("--shutdown-grace", "1", "--metrics-listen", f"127.0.0.1:{metrics_port}", env=env)
    try:
        results: list[tuple[float, float, Any]] = []
        samples: list[int] = []

        async def run() -> None:
            stop = asyncio.Event()
            load = asyncio.ensure_future(_hammer(sc.listen, stop, 16, results))
            for _ in range(16):
                await asyncio.sleep(0.25)
                samples.append(rss_kib(sc.proc.pid))
            stop.set()
            await load

        asyncio.run(run())
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        sc.proc.send_signal(signal.SIGTERM)
        assert sc.proc.wait(timeout=20) == 0
    finally:
        err = sc.close()
    bad = [r for r in results if r[2] != "ok"]
    assert not bad, bad[:5]
    assert len(results) > 2000  # many times the queue size
    warm = samples[3]
    assert samples[-1] - warm < 16 * 1024, samples  # KiB: bounded, not one entry per span
    dropped = sample(metrics, "stepup_spans_dropped_total")
    assert dropped > 0 and dropped <= len(results)
    assert sample(metrics, "stepup_decisions_total") >= len(results) - 16
    # Dropped spans are counted, not logged one by one: a few lines per export attempt at most.
    assert err.count("\n") < len(results) / 20, err[-2000:]


def sample(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- a slow JWKS URL ----------------------------------------------------------------------------


class SlowIdP:
    """A JWKS endpoint that answers at once at load, then blocks until released."""

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, url: str, timeout: float) -> bytes:
        self.fetches += 1
        if self.fetches > 1:
            self.entered.set()
            assert self.release.wait(10)
        return json.dumps({"keys": self.keys}).encode()


def test_slow_jwks_refresh_does_not_block_decisions_for_cached_keys() -> None:
    """While a refresh for an unknown kid hangs on the IdP: the call that triggered it is answered
    (unknown_key) without waiting for the IdP, tokens with cached keys are decided at once, more
    unknown kids trigger no more fetches; once the IdP answers, the new key verifies."""
    public = {k: v for k, v in PRIVATE_JWK.items() if k in ("kty", "n", "e", "kid", "alg", "use")}
    rotated = RSAKey.generate_key(2048, parameters={"kid": "rotated-2"})
    idp = SlowIdP(public)
    text = EXAMPLE_POLICY.read_text().replace(
        "jwks_file: keys/dev-jwks.json", "jwks_uri: https://idp.example.test/jwks"
    )
    policy = load_policy_text(text, base_dir=EXAMPLE_POLICY.parent, fetch=idp)
    remote = policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    remote._last_attempt = float("-inf")  # let the first unknown kid refresh now
    idp.keys.append(rotated.as_dict(private=False))
    rotated_req = check_request(BALANCE, token=make_token(header={"kid": "rotated-2"}, key=rotated))
    srv = Running()
    try:
        srv.runtime.swap(policy)
        stub = external_auth_pb2_grpc.AuthorizationStub(srv.channel)
        first = stub.Check(rotated_req, timeout=5)
        assert (first.status.code, first.status.message) == (16, "unknown_key")
        assert idp.entered.is_set() and not idp.release.is_set()  # answered while the fetch hangs
        for i in range(50):
            resp = stub.Check(check_request(BALANCE, token=make_token(sub=f"u{i}", key=DEV_KEY)), timeout=2)
            assert resp.status.code == 0
        other = stub.Check(
            check_request(BALANCE, token=make_token(header={"kid": "nope"}, key=DEV_KEY)), timeout=2
        )
        assert (other.status.code, other.status.message) == (16, "unknown_key")
        assert idp.fetches == 2
        idp.release.set()
        deadline = time.monotonic() + 5
        while stub.Check(rotated_req, timeout=2).status.code != 0:
            assert time.monotonic() < deadline, "the refreshed key never verified the rotated token"
            time.sleep(0.05)
        assert idp.fetches == 2
    finally:
        idp.release.set()
        srv.stop()
