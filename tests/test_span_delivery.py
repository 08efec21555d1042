"""A span for every decision, at the load we serve (the perf-and-tracing issue): every decision is
sampled, exported over OTLP/gRPC to a live receiver at a moderate steady rate, and every span
arrives; none is dropped. (Before: 2,071 of 6,189 at ~1,200 decisions/s, because the export
queue was only drained on the five-second schedule.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc

from examples.stack import free_port, wait_serving
from tests.helpers import EXAMPLE_POLICY, check_request, make_token
from tests.otlp_receiver import Receiver

CHECK = "/envoy.service.auth.v3.Authorization/Check"
RATE = 600  # decisions per second, for
SECONDS = 4


def _sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


async def _steady(address: str, bodies: list[bytes]) -> int:
    sent = 0
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
        start = time.monotonic()
        pending = set()
        for i in range(RATE * SECONDS):
            due = start + i / RATE
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.add(asyncio.ensure_future(call(bodies[i % len(bodies)], timeout=10)))
            sent += 1
            if len(pending) > 64:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
    return sent


def test_every_span_arrives_at_a_live_receiver_at_a_steady_rate() -> None:
    receiver = Receiver()
    listen, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(EXAMPLE_POLICY), "--listen", listen,
         "--metrics-listen", f"127.0.0.1:{metrics_port}", "--decision-log", "off", "--watch-interval", "0"],
        env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_serving(listen)
        now = time.time()
        bodies = [
            check_request("/bank.v1.Accounts/GetBalance", token=make_token(now=now, sub=f"u{i}", exp=int(now) + 600)).SerializeToString()
            for i in range(20)
        ] + [check_request("/healthz", method="GET", grpc=False).SerializeToString()]
        sent = asyncio.run(_steady(listen, bodies))
        deadline = time.monotonic() + 20
        while len(receiver.spans) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        receiver.stop()
    decisions = _sample(metrics, "stepup_decisions_total")
    assert decisions == sent == RATE * SECONDS
    assert _sample(metrics, "stepup_spans_dropped_total") == 0
    assert _sample(metrics, "stepup_span_export_failures_total") == 0
    assert len(receiver.spans) == sent
    assert len({s.span_id for s in receiver.spans}) == sent  # one span per decision, none twice
    assert receiver.requests < sent / 50  # in batches, not one export per span
