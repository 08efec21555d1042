"""The operator's HTTP port (`--metrics-listen`): Prometheus `/metrics`, plus `/healthz` (the
process's event loop is turning) and `/readyz` (Check is being served) for systems without gRPC
probes. A thread of its own: a scrape or a probe never waits for the event loop, and a wedged
loop shows as a failing `/healthz`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("stepup")

STALL = 10.0  # seconds without a heartbeat after which /healthz fails


class Liveness:
    """Beaten by the event loop (every half second); `/healthz` fails when it stops."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.ready = False

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < STALL


def start_ops_server(
    address: str, registry: CollectorRegistry, alive: Callable[[], bool], ready: Callable[[], bool]
) -> ThreadingHTTPServer:
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(registry), content_type)
            elif path == "/healthz":
                ok = alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"event loop stalled\n")
            elif path == "/readyz":
                ok = alive() and ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not serving\n")
            else:
                self._send(404, b"not found: /metrics, /healthz, /readyz\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds: not worth a log line each

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    server = Server((host or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="stepup-ops-http", daemon=True).start()
    return server
