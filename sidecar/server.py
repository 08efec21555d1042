"""Thin gRPC layer: Authorization/Check, Explain, health and reflection on one port.

The servicer never raises because of a request's content: any unexpected error becomes a denial
(fail closed) that is logged, traced and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar import reasons as R
from sidecar import response
from sidecar.attributes import RequestAttributes, from_check_request
from sidecar.config import PolicyError
from sidecar.decision import Decision
from sidecar.engine import Engine, Policy
from sidecar.isolated import load_isolated, retire, settle
from sidecar.jwks import RemoteKeys
from sidecar.reasons import Reason
from sidecar.telemetry import Telemetry

from sidecar._proto.stepup.v1 import explain_pb2, explain_pb2_grpc  # isort: skip

log = logging.getLogger("stepup")

AUTH_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
EXPLAIN_SERVICE = explain_pb2.DESCRIPTOR.services_by_name["Explain"].full_name

REFRESH_WAIT = 0.15  # seconds a Check may wait for a JWKS fetch triggered by an unknown kid

def _fixed(r: Reason) -> Decision:
    return Decision(r.outcome, r.code, r.http_status, r.description, error=r.error)


_INTERNAL = _fixed(R.INTERNAL_ERROR)
_MALFORMED = _fixed(R.MALFORMED_REQUEST)


def log_internal_error(what: str, e: BaseException, **extra: Any) -> None:
    """Log an unexpected exception WITHOUT its message or locals: a message can quote request
    content (a claim, a header). The type and the innermost frames say where it happened."""
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    log.error("%s", what, extra={"error": type(e).__name__, "where": where, **extra})


def new_decision_id() -> str:
    return secrets.token_hex(8)


@dataclass
class _Evaluation:
    decision: Decision
    attrs: RequestAttributes | None
    policy: Policy
    error: BaseException | None


class Decider:
    """Holds the current policy (swapped atomically on reload) and evaluates requests."""

    def __init__(self, policy: Policy, telemetry: Telemetry, clock: Callable[[], float] = time.time) -> None:
        self.engine = Engine(policy)
        self.telemetry = telemetry
        self.clock = clock

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    def swap(self, policy: Policy) -> None:
        self.engine = Engine(policy)

    async def evaluate(self, request: Any) -> _Evaluation:
        engine = self.engine  # one policy for the whole call, even if a reload lands meanwhile
        attrs: RequestAttributes | None = None
        try:
            attrs = from_check_request(request)
            decision = engine.decide(attrs, self.clock())
            if decision.reason == "unknown_key" and await self._refresh_keys(engine.policy):
                decision = engine.decide(attrs, self.clock())
            return _Evaluation(decision, attrs, engine.policy, None)
        except Exception as e:
            log_internal_error("internal error while deciding; denying", e)
            self.telemetry.metrics.internal_errors.inc()
            return _Evaluation(_INTERNAL, attrs, engine.policy, e)

    async def _refresh_keys(self, policy: Policy, wait: float = REFRESH_WAIT) -> bool:
        """Fetch remote JWKS that may be refreshed now (rate-limited), in a thread. Waits at most
        `wait` seconds, well inside Envoy's Check timeout; a slower fetch completes in the
        background and serves later calls."""
        remotes = [i.keys for i in policy.issuers if isinstance(i.keys, RemoteKeys) and i.keys.may_refresh()]
        if not remotes:
            return False
        loop = asyncio.get_running_loop()
        fetches = asyncio.gather(*(loop.run_in_executor(None, r.refresh) for r in remotes))
        try:
            results = await asyncio.wait_for(asyncio.shield(fetches), wait)
        except TimeoutError:
            return False
        return any(results)

    async def refresh_stale_keys(self) -> None:
        """Periodic: refetch remote JWKS whose cache time has passed (keys removed by the IdP stop
        verifying; new ones are known before the first token that uses them)."""
        policy = self.policy
        stale = [i.keys for i in policy.issuers if isinstance(i.keys, RemoteKeys) and not i.keys.is_fresh()]
        if stale:
            await self._refresh_keys(policy, wait=60.0)

    def record(self, ev: _Evaluation, decision_id: str, start_ns: int, *, explain: bool = False) -> None:
        try:
            parent = self.telemetry.parent(ev.attrs.headers) if ev.attrs is not None else None
            self.telemetry.record(
                decision=ev.decision,
                attrs=ev.attrs,
                decision_id=decision_id,
                policy_version=ev.policy.version,
                level_names=ev.policy.levels,
                start_ns=start_ns,
                parent=parent,
                error=ev.error,
                explain=explain,
            )
        except Exception as e:
            log_internal_error("telemetry failed", e, decision_id=decision_id)


def _parse(data: bytes) -> Any | None:
    try:
        return external_auth_pb2.CheckRequest.FromString(data)
    except Exception:  # DecodeError, or a message nested deeper than protobuf's recursion limit
        return None


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Authorization/Check. Registered on raw bytes (`check_bytes`): a request that does not even
    parse is answered with a denial like any other, never failed (Envoy would apply
    `status_on_error`) and never an exception inside gRPC."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    async def check_bytes(self, data: bytes, context: Any) -> bytes:
        request = _parse(data)
        if request is None:
            start_ns = time.time_ns()
            decision_id = new_decision_id()
            ev = _Evaluation(_MALFORMED, None, self.decider.policy, None)
            resp = response.deny(_MALFORMED, decision_id, ev.policy.realm, False)
            self.decider.record(ev, decision_id, start_ns)
        else:
            resp = await self.Check(request, context)
        out: bytes = resp.SerializeToString()
        return out

    async def Check(self, request: Any, context: Any) -> Any:
        start_ns = time.time_ns()
        decision_id = new_decision_id()
        ev = await self.decider.evaluate(request)
        try:
            d = ev.decision
            p = ev.policy
            if d.allowed:
                resp = response.allow(d, decision_id, p.levels, p.upstream_headers)
            else:
                resp = response.deny(d, decision_id, p.realm, ev.attrs.is_grpc if ev.attrs else False)
        except Exception as e:
            log_internal_error("could not build the response; denying", e)
            self.decider.telemetry.metrics.internal_errors.inc()
            ev = _Evaluation(_INTERNAL, ev.attrs, ev.policy, e)
            resp = response.deny(_INTERNAL, decision_id, "stepup", False)
        self.decider.record(ev, decision_id, start_ns)
        return resp


class ExplainServicer(explain_pb2_grpc.ExplainServicer):  # type: ignore[misc]
    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    async def Explain(self, request: Any, context: Any) -> Any:
        """Like Check, and logged like Check (marked `explain`): never an unaudited oracle."""
        start_ns = time.time_ns()
        decision_id = new_decision_id()
        ev = await self.decider.evaluate(request)
        self.decider.record(ev, decision_id, start_ns, explain=True)
        return explain_response(ev.decision, ev.policy, decision_id, self.decider.clock())


def explain_response(d: Decision, p: Policy, decision_id: str, now: float) -> Any:
    req = d.requirement
    ident = d.identity
    requirement = explain_pb2.Requirement()
    if req is not None:
        requirement = explain_pb2.Requirement(
            sensitivity=req.sensitivity,
            min_assurance=p.levels[req.min_level] if req.min_level is not None else "",
            max_age_seconds=req.max_age or 0,
            required_amr=sorted(req.required_amr),
            risk_rules=list(req.risk_rules),
        )
    elif d.sensitivity:
        requirement.sensitivity = d.sensitivity
    presented = explain_pb2.Presented(credential="none", auth_age_seconds=-1)
    if ident is not None:
        presented = explain_pb2.Presented(
            subject=ident.subject,
            issuer=ident.issuer,
            principal=ident.principal,
            assurance=p.levels[ident.level] if ident.level is not None else "",
            acr=" ".join(ident.acr),
            amr=list(ident.amr),
            auth_age_seconds=int(now - ident.auth_time) if ident.auth_time is not None else -1,
            credential=ident.credential,
        )
    return explain_pb2.ExplainResponse(
        outcome=d.outcome.value,
        reason=d.reason,
        http_status=d.http_status,
        description=d.description,
        matched_rules=list(d.matched_rules),
        requirement=requirement,
        presented=presented,
        www_authenticate=response.challenge(d, p.realm),
        policy_version=p.version,
        decision_id=decision_id,
        normalized_path=d.path,
    )


class PolicyWatcher:
    """Reloads the policy when its file (or a ConfigMap's `..data` symlink swap) changes, and on
    SIGHUP.

    A new policy is validated completely before it replaces the old one; a broken one is reported
    and the last good policy keeps serving. Reloads never overlap and never finish out of order:
    each runs after the previous one, reads the file as it is when it starts, and requests that
    arrive while one runs are served by the next, so the newest file always wins and stays. The
    default loader parses and validates in a child process (`sidecar.isolated`), so a large
    policy does not stall the Checks being answered meanwhile."""

    def __init__(
        self, path: Path, decider: Decider, interval: float, loader: Callable[[Path], Policy] = load_isolated
    ):
        self.path = path
        self.decider = decider
        self.interval = interval
        self.loader = loader
        self.last_error: str = ""
        self._stamp = self._fingerprint()
        self._lock = asyncio.Lock()
        self._requested = 0  # reload requests so far
        self._covered = 0  # requests a finished or running load has started after
        self._last_result = False

    def _fingerprint(self) -> tuple[Any, ...]:
        """Identity of the policy file and the JWKS files it names (a ConfigMap swaps all at once)."""
        stamp: list[Any] = []
        for f in (str(self.path), *self.decider.policy.files):
            try:
                real = os.path.realpath(f)
                st = os.stat(real)
                stamp.append((real, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append((str(f), "missing"))
        return tuple(stamp)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()
            await self.decider.refresh_stale_keys()

    async def check(self) -> bool:
        if self._fingerprint() == self._stamp:
            return False
        return await self.reload()

    async def reload(self) -> bool:
        self._requested += 1
        ticket = self._requested
        async with self._lock:
            if self._covered >= ticket:
                return self._last_result  # a load that started after this request has run
            self._covered = self._requested
            self._last_result = await self._load()
            return self._last_result

    async def _load(self) -> bool:
        metrics = self.decider.telemetry.metrics
        loop = asyncio.get_running_loop()
        # Taken before reading: a change made while loading shows as a difference next time.
        stamp = self._fingerprint()
        try:
            policy = await loop.run_in_executor(None, self.loader, self.path)
        except PolicyError as e:
            self._stamp = stamp
            self.last_error = str(e)
            metrics.reloads.labels("rejected").inc()
            log.error("policy reload rejected; keeping %s:\n%s", self.decider.policy.version, e)
            return False
        except Exception as e:
            self._stamp = stamp
            self.last_error = type(e).__name__
            metrics.reloads.labels("rejected").inc()
            log_internal_error(f"policy reload failed; keeping {self.decider.policy.version}", e)
            return False
        replaced = self.decider.policy
        old = replaced.version
        self.decider.swap(policy)
        self._stamp = stamp
        settle(policy)
        loop.run_in_executor(None, retire, [replaced])
        del replaced
        self.last_error = ""
        metrics.reloads.labels("applied").inc()
        log.info("policy reloaded: %s -> %s", old, policy.version)
        for w in policy.warnings:
            log.warning("policy: %s", w)
        return True


def build_server(
    decider: Decider, *, explain: bool = True
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    # so_reuseport off: a second sidecar on the same port must fail, not share the traffic.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 20), ("grpc.so_reuseport", 0)])
    servicer = AuthorizationServicer(decider)
    check = grpc.unary_unary_rpc_method_handler(servicer.check_bytes)  # bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTH_SERVICE, {"Check": check}),))
    names = [AUTH_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if explain:
        explain_pb2_grpc.add_ExplainServicer_to_server(ExplainServicer(decider), server)
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
