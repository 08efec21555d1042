"""A recording HTTP/1.1 upstream for the path differential test: answers every request with 200 and
writes what it received, byte for byte, as one JSON line on stdout.

Nothing here parses or decodes the request-target: it is kept exactly as its bytes arrived (as a
latin-1 string, so that every byte round-trips through JSON). Keep-alive is supported, since Envoy
reuses its upstream connections.

    python tests/e2e/recorder.py [--listen 127.0.0.1:0]

The first stdout line is `{"port": N}` once it listens; then one line per request:
`{"method": ..., "target": ..., "version": ..., "headers": [[name, value], ...]}` (credentials
redacted). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import sys
import threading
from typing import Any

_LOCK = threading.Lock()
_MAX_HEAD = 64 * 1024
_SECRET = frozenset({"authorization", "cookie"})  # credentials stay out of the log


def _emit(doc: dict[str, Any]) -> None:
    line = json.dumps(doc, separators=(",", ":")) + "\n"
    with _LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while self._one():
            pass

    def _one(self) -> bool:
        """Serve one request; False when the connection is done."""
        start = self.rfile.readline(_MAX_HEAD)
        while start in (b"\r\n", b"\n"):  # tolerated empty lines before a request (RFC 9112 §2.2)
            start = self.rfile.readline(_MAX_HEAD)
        if not start:
            return False
        line = start.rstrip(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3:  # never expected from Envoy: logged, so that a test can see it
            doc = {"error": "bad request line", "line": line.decode("latin-1")}
            _emit(doc)
            self._reply(400, doc, close=True)
            return False
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        while True:
            h = self.rfile.readline(_MAX_HEAD)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.rstrip(b"\r\n").partition(b":")
            key = name.decode("latin-1").strip().lower()
            headers.append((key, "<redacted>" if key in _SECRET else value.decode("latin-1").strip()))
        self._drain_body(headers)
        doc = {
            "method": method.decode("latin-1"),
            "target": target.decode("latin-1"),
            "version": version.decode("latin-1"),
            "headers": headers,
        }
        _emit(doc)
        close = any(k == "connection" and v.lower() == "close" for k, v in headers)
        self._reply(200, doc, close=close, head=method == b"HEAD")
        return not close

    def _drain_body(self, headers: list[tuple[str, str]]) -> None:
        values = dict(headers)
        if values.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline(_MAX_HEAD).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(_MAX_HEAD) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                self.rfile.read(size + 2)
        length = int(values.get("content-length", "0") or "0")
        if length:
            self.rfile.read(length)

    def _reply(self, status: int, doc: dict[str, Any], *, close: bool, head: bool = False) -> None:
        """Answer with the record as JSON (no body for HEAD: Envoy would not read one)."""
        body = json.dumps({"recorder": True, **doc}, separators=(",", ":")).encode()
        lines = [
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Bad Request'}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "x-recorder: 1",
            *(["connection: close"] if close else []),
        ]
        start = ("\r\n".join(lines) + "\r\n\r\n").encode()
        try:
            self.wfile.write(start + (b"" if head else body))
            self.wfile.flush()
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    with _Server((host, int(port)), _Handler) as server:
        _emit({"port": server.server_address[1]})
        server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
