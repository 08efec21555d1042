"""The demo bank upstream: bank.v1 Accounts / Payments / Admin over plaintext gRPC, and a tiny
plain-HTTP upstream, both echoing the identity the sidecar handed them.

    python examples/bank_server.py --grpc-listen 127.0.0.1:50051 --http-listen 127.0.0.1:8081

Port 0 picks a free port. When both servers listen, one JSON line goes to stdout, e.g.
``{"grpc_port": 50051, "http_port": 8081}``; nothing else is written there.

What the upstream saw comes back to the caller:
- gRPC: the response fields ``seen_subject`` / ``seen_assurance``, and for every received request
  header named ``x-auth-*`` or ``traceparent`` one initial-metadata entry ``x-echo-<name>`` per
  value (so a spoofed value that survived next to ours would show as a second entry).
- HTTP: status 200 and a JSON body ``{"method", "path", "headers": {name: [values...]}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from sidecar._proto.bank.v1 import bank_pb2, bank_pb2_grpc

ECHO_PREFIXES = ("x-auth-", "traceparent")


def _received(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str)]


def _first(md: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in md if k == name), "")


async def _echo(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    md = _received(context)
    echo = tuple((f"x-echo-{k}", v) for k, v in md if k.startswith(ECHO_PREFIXES))
    await context.send_initial_metadata(echo)
    return md


class Accounts(bank_pb2_grpc.AccountsServicer):  # type: ignore[misc]
    async def GetBalance(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        md = await _echo(context)
        return bank_pb2.Balance(
            account_id=request.account_id,
            amount_cents=123_456,
            currency="EUR",
            seen_subject=_first(md, "x-auth-subject"),
            seen_assurance=_first(md, "x-auth-assurance"),
        )


class Payments(bank_pb2_grpc.PaymentsServicer):  # type: ignore[misc]
    async def Transfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        md = await _echo(context)
        return bank_pb2.TransferReceipt(
            transfer_id="tr_" + secrets.token_hex(4),
            seen_subject=_first(md, "x-auth-subject"),
            seen_assurance=_first(md, "x-auth-assurance"),
        )


class Admin(bank_pb2_grpc.AdminServicer):  # type: ignore[misc]
    async def SetPermissions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        md = await _echo(context)
        return bank_pb2.SetPermissionsResponse(seen_subject=_first(md, "x-auth-subject"))


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The status line, headers and body go out as separate writes: without TCP_NODELAY, Nagle and
    # Envoy's delayed ACK add 40 ms to every answer on a kept-alive connection.
    disable_nagle_algorithm = True

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        seen: dict[str, list[str]] = {}
        for k, v in self.headers.items():
            seen.setdefault(k.lower(), []).append(v)
        body = json.dumps({"method": self.command, "path": self.path, "headers": seen}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(grpc_listen: str, http_listen: str) -> None:
    server = grpc.aio.server()
    bank_pb2_grpc.add_AccountsServicer_to_server(Accounts(), server)
    bank_pb2_grpc.add_PaymentsServicer_to_server(Payments(), server)
    bank_pb2_grpc.add_AdminServicer_to_server(Admin(), server)
    grpc_port = server.add_insecure_port(grpc_listen)
    await server.start()
    ready: dict[str, int] = {"grpc_port": grpc_port}
    httpd: ThreadingHTTPServer | None = None
    if http_listen:
        httpd = ThreadingHTTPServer(_split(http_listen), _EchoHandler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        ready["http_port"] = httpd.server_address[1]
    print(json.dumps(ready), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if httpd is not None:
        httpd.shutdown()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--grpc-listen", default="127.0.0.1:50051", help="HOST:PORT (port 0: any free port)")
    ap.add_argument(
        "--http-listen", default="", help="HOST:PORT of the plain-HTTP echo upstream (off if empty)"
    )
    args = ap.parse_args(argv)
    asyncio.run(serve(args.grpc_listen, args.http_listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
