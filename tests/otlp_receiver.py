"""A real OTLP trace receiver for tests: `opentelemetry.proto`'s TraceService over gRPC (and
OTLP/HTTP protobuf on another port), keeping every span it is sent. Run in-process (`Receiver`)
or as `python tests/otlp_receiver.py` (prints its ports as JSON, then serves until killed)."""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, port: int = 0) -> None:
        self.spans: list[Any] = []
        self.requests = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:
        self.take(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def take(self, request: Any) -> None:
        with self._lock:
            self.requests += 1
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)

    def attributes(self, span: Any) -> dict[str, Any]:
        out = {}
        for kv in span.attributes:
            v = kv.value
            out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
        return out

    def stop(self) -> None:
        self.server.stop(0)


def main() -> int:
    """Serve OTLP/gRPC on a free port, and the number of spans received as JSON on an HTTP port;
    print both ports as one JSON line."""
    r = Receiver()

    class Count(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"spans": len(r.spans), "requests": r.requests}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Count)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print(json.dumps({"grpc_port": r.port, "http_port": http.server_address[1]}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
