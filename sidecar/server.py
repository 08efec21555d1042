"""Thin gRPC layer: Authorization/Check, Explain, health and reflection on one port.

The servicers never raise because of a request's content: the runtime turns any unexpected error
into a denial (fail closed) that is logged, traced and counted.
"""

from __future__ import annotations

import os
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar import response
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from sidecar.explain import explain_response
from sidecar.runtime import INTERNAL, MALFORMED, Evaluation, Runtime, wire_answer
from sidecar.telemetry import log_internal_error

from sidecar._proto.stepup.v1 import explain_pb2, explain_pb2_grpc  # isort: skip

AUTH_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
EXPLAIN_SERVICE = explain_pb2.DESCRIPTOR.services_by_name["Explain"].full_name


_ID_POOL_BYTES = 8 * 512


class _Ids:
    """Decision ids: 64 random bits as 16 hex characters, drawn from a pool of urandom bytes
    refilled every 512 ids (cheap: one system call per 512 Checks). An id tells nothing about
    the ones before or after it (a per-process prefix and a counter did: anyone shown one id
    could name the next and read the traffic between two of theirs, red-team F8); a repeat is
    as unlikely as a 64-bit collision (one in 10,000 after 60 million ids)."""

    def __init__(self) -> None:
        self.pool = ""
        self.pos = 0
        os.register_at_fork(after_in_child=self.reset)  # a forked child must not repeat the pool

    def reset(self) -> None:
        self.pool, self.pos = "", 0

    def next(self) -> str:
        pos = self.pos
        if pos >= len(self.pool):
            self.pool, pos = os.urandom(_ID_POOL_BYTES).hex(), 0
        self.pos = pos + 16
        return self.pool[pos : pos + 16]


new_decision_id = _Ids().next


def _parse(data: bytes) -> Any | None:
    try:
        return external_auth_pb2.CheckRequest.FromString(data)
    except Exception:  # DecodeError, or a message nested deeper than protobuf's recursion limit
        return None


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Authorization/Check. Registered on raw bytes (`check_bytes`): a request that does not even
    parse is answered with a denial like any other, never failed (Envoy would apply
    `status_on_error`) and never an exception inside gRPC."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def check_bytes(self, data: bytes, context: Any) -> bytes:
        request = _parse(data)
        if request is None:
            start_ns = time.time_ns()
            decision_id = new_decision_id()
            ev = Evaluation(MALFORMED, None, self.runtime.policy, None)
            resp = response.deny(MALFORMED, decision_id, ev.policy.realm, False)
            self.runtime.record(ev, decision_id, start_ns)
            out: bytes = resp.SerializeToString()
            return out
        start_ns = time.time_ns()
        decision_id = new_decision_id()
        ev = await self.runtime.evaluate(request)
        try:
            if ev.decision.allowed:
                hdrs = ev.policy.upstream_headers
                data = response.allow_bytes(ev.decision, decision_id, hdrs, ev.remembered)
            else:
                data = wire_answer(ev, decision_id).SerializeToString()
        except Exception as e:
            log_internal_error("could not build the response; denying", e)
            self.runtime.telemetry.metrics.internal_errors.inc()
            ev = Evaluation(INTERNAL, ev.attrs, ev.policy, e)
            data = response.deny(INTERNAL, decision_id, "stepup", False).SerializeToString()
        self.runtime.record(ev, decision_id, start_ns)
        return data

    async def Check(self, request: Any, context: Any) -> Any:
        start_ns = time.time_ns()
        decision_id = new_decision_id()
        ev = await self.runtime.evaluate(request)
        try:
            resp = wire_answer(ev, decision_id)
        except Exception as e:
            log_internal_error("could not build the response; denying", e)
            self.runtime.telemetry.metrics.internal_errors.inc()
            ev = Evaluation(INTERNAL, ev.attrs, ev.policy, e)
            resp = response.deny(INTERNAL, decision_id, "stepup", False)
        self.runtime.record(ev, decision_id, start_ns)
        return resp


class ExplainServicer(explain_pb2_grpc.ExplainServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def Explain(self, request: Any, context: Any) -> Any:
        """Like Check, and logged like Check (marked `explain`): never an unaudited oracle."""
        start_ns = time.time_ns()
        decision_id = new_decision_id()
        ev = await self.runtime.evaluate(request)
        self.runtime.record(ev, decision_id, start_ns, explain=True)
        return explain_response(ev, decision_id, self.runtime.clock())


def build_server(
    runtime: Runtime, *, explain: bool = True
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    # so_reuseport off: a second sidecar on the same port must fail, not share the traffic.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 20), ("grpc.so_reuseport", 0)])
    servicer = AuthorizationServicer(runtime)
    check = grpc.unary_unary_rpc_method_handler(servicer.check_bytes)  # bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTH_SERVICE, {"Check": check}),))
    names = [AUTH_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if explain:
        explain_pb2_grpc.add_ExplainServicer_to_server(ExplainServicer(runtime), server)
        names.append(EXPLAIN_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


def build_health_server(health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    """A second server carrying only grpc.health.v1, for an address the kubelet can reach (its
    gRPC probes dial the pod IP) while Check stays on loopback."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server


async def set_serving(h: health.aio.HealthServicer, serving: bool, explain: bool = True) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", AUTH_SERVICE, *([EXPLAIN_SERVICE] if explain else [])):
        await h.set(name, status)
