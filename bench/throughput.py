"""Check throughput of the real server under h2load, as a ratio to a bare server in the same run.

The bare server is a grpc.aio servicer on uvloop that answers every Check with a constant OK
(the floor any Python ext_authz server pays). Both run as separate processes on loopback and get
the same load: h2load (Debian package nghttp2-client) sending one realistic CheckRequest (a cached
token, allowed) over a few connections. Prints calls/s for each and the ratio.

    python bench/throughput.py [--seconds 10] [--clients 4] [--streams 32]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.stack import free_port  # noqa: E402
from tests.helpers import ACR_PHR, EXAMPLE_POLICY, check_request, make_token  # noqa: E402

BARE = """
import asyncio, sys, uvloop, grpc
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb, external_auth_pb2_grpc as rpc
from google.rpc import status_pb2
OK = pb.CheckResponse(status=status_pb2.Status(code=0))
class S(rpc.AuthorizationServicer):
    async def Check(self, request, context):
        return OK
async def main():
    server = grpc.aio.server()
    rpc.add_AuthorizationServicer_to_server(S(), server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    await server.wait_for_termination()
uvloop.run(main())
"""


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(port)


def h2load(port: int, body: Path, seconds: int, clients: int, streams: int) -> tuple[float, int, int]:
    out = subprocess.run(
        [
            "h2load",
            "-D",
            str(seconds),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    assert m is not None, out
    return rps, int(m.group(2)), int(m.group(3))


def run(
    cmd: list[str], port: int, body: Path, args: argparse.Namespace, env: dict[str, str]
) -> tuple[float, int, int]:
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_port(port)
        time.sleep(0.5)
        h2load(port, body, 2, args.clients, args.streams)  # warm-up
        return h2load(port, body, args.seconds, args.clients, args.streams)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--streams", type=int, default=32)
    args = ap.parse_args()
    if not shutil.which("h2load"):
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    token = make_token(now=time.time(), acr=ACR_PHR, exp=int(time.time()) + 3600)
    msg = check_request(
        "/bank.v1.Payments/Transfer",
        token=token,
        headers={
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "user-agent": "grpc-go/1.70",
            "x-request-id": "a3f1c6c2-1b1e-4c55-9d6e-3f5c2a8c9e11",
            "x-forwarded-proto": "http",
            "te": "trailers",
        },
    ).SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "check.bin"
        body.write_bytes(b"\x00" + struct.pack(">I", len(msg)) + msg)
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
        results = {}
        p = free_port()
        results["bare constant-OK server"] = run(
            [sys.executable, "-c", BARE, f"127.0.0.1:{p}"], p, body, args, env
        )
        for label, extra_env in (
            ("decision log off", {"STEPUP_DECISION_LOG": "off"}),
            ("decision log on", {"STEPUP_DECISION_LOG": "stdout"}),
        ):
            p = free_port()
            cmd = [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--policy",
                str(EXAMPLE_POLICY),
                "--listen",
                f"127.0.0.1:{p}",
            ]
            results[f"stepup-sidecar, {label}"] = run(cmd, p, body, args, env | extra_env)
    base = results["bare constant-OK server"][0]
    print(f"h2load -D {args.seconds} -c {args.clients} -m {args.streams}, one allowed Check (cached token)")
    for name, (rps, ok, failed) in results.items():
        print(f"  {name:36} {rps:9.0f} calls/s  ratio {rps / base:5.2f}   ({ok} ok, {failed} failed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
