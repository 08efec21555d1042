"""The serving process's state: the active policy and its reloads, the key store and the
verified-token cache shared by every policy, key refresh, and the evaluation of one request.

`Runtime.evaluate` never raises because of a request's content: any unexpected error becomes a
denial (fail closed) that is logged and counted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar import reasons as R
from sidecar import response
from sidecar.attributes import RequestAttributes, from_check_request
from sidecar.compiler import prime
from sidecar.decision import Decision
from sidecar.engine import DECISION_CACHE, Engine, IdentityCell, ShadowResult
from sidecar.isolated import file_stamp, load_isolated, retire, settle
from sidecar.keys import KeyStore, RemoteKeys
from sidecar.policy import Policy
from sidecar.policyfile import PolicyError
from sidecar.reasons import Reason
from sidecar.telemetry import Telemetry, log_internal_error, trace_ids
from sidecar.tokens import Uncounted, Verifier

log = logging.getLogger("stepup")

REFRESH_WAIT = 0.15  # seconds a Check may wait for a JWKS fetch triggered by an unknown kid


def fixed_decision(r: Reason) -> Decision:
    """A decision that needs no request (an internal error, an unparsable request)."""
    return Decision(r.outcome, r.code, r.http_status, r.description, error=r.error)


INTERNAL = fixed_decision(R.INTERNAL_ERROR)
MALFORMED = fixed_decision(R.MALFORMED_REQUEST)


@dataclass(slots=True)  # (and made positionally: a keyword made the call build a dict, 3x the cost)
class Evaluation:
    decision: Decision
    attrs: RequestAttributes | None
    policy: Policy
    error: BaseException | None
    shadow: tuple[ShadowResult, ...] = ()  # shadow rules that would have answered otherwise
    candidate: Decision | None = None  # the candidate policy's decision, when one is loaded
    candidate_version: str = ""
    # The engine's cache holds this Decision object: what the edges derive from it (log line,
    # span attributes, allow template) may be remembered with it.
    remembered: bool = False


def wire_answer(ev: Evaluation, decision_id: str) -> Any:
    """The CheckResponse for an evaluation (what Envoy gets; also what `stepup-sidecar test` checks)."""
    d, p = ev.decision, ev.policy
    if d.allowed:
        return response.allow(d, decision_id, p.upstream_headers)
    return response.deny(d, decision_id, p.realm, ev.attrs.is_grpc if ev.attrs else False)


class Runtime:
    """What lives for the serving process: the active policy (swapped atomically on reload), the
    key store and the verified-token cache that every policy shares, and the evaluation of one
    request with telemetry."""

    def __init__(
        self,
        policy: Policy,
        telemetry: Telemetry,
        clock: Callable[[], float] = time.time,
        *,
        keys: KeyStore | None = None,
        verifier: Verifier | None = None,
        decision_cache: int = DECISION_CACHE,
    ) -> None:
        """`decision_cache`: allowed decisions each policy's engine remembers (Engine.decide)."""
        self.keys = keys if keys is not None else KeyStore()
        self.verifier = verifier if verifier is not None else Verifier()
        self.decision_cache = decision_cache
        self._retired_cache = (0, 0)  # hits and misses of the engines that reloads replaced
        self.engine = Engine(policy, self.verifier, cache_size=decision_cache)
        self.candidate: Engine | None = None  # `serve --candidate`: decided beside, never enforced
        self.telemetry = telemetry
        self.clock = clock

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @property
    def candidate_policy(self) -> Policy | None:
        return self.candidate.policy if self.candidate is not None else None

    def swap(self, policy: Policy) -> None:
        hits, misses = self.decision_cache_counts
        self._retired_cache = (hits, misses)
        self.engine = Engine(policy, self.verifier, cache_size=self.decision_cache)

    @property
    def decision_cache_counts(self) -> tuple[int, int]:
        """(hits, misses) of the active policies' decision caches since start (the candidate's
        are not traffic)."""
        hits, misses = self._retired_cache
        return hits + self.engine.cache_hits, misses + self.engine.cache_misses

    def swap_candidate(self, policy: Policy | None) -> None:
        if policy is None:
            self.candidate = None
            return
        self.candidate = Engine(policy, self.verifier, cache_size=self.decision_cache)
        self.candidate.verifier = Uncounted(self.verifier)

    def key_providers(self) -> list[Any]:
        """The key sources the active and the candidate policy use (the ones to keep)."""
        policies = [self.policy, *([self.candidate.policy] if self.candidate is not None else [])]
        return [i.keys for p in policies for i in p.issuers if i.keys is not None]

    async def evaluate(self, request: Any) -> Evaluation:
        engine = self.engine  # one policy for the whole call, even if a reload lands meanwhile
        candidate = self.candidate
        attrs: RequestAttributes | None = None
        try:
            attrs = from_check_request(request)
            now = self.clock()
            cell = IdentityCell() if engine.shadows else None
            decision, remembered = engine.decide_remembered(attrs, now, cell)
            if decision.reason == "unknown_key" and await self._refresh_keys(engine.policy):
                now = self.clock()
                cell = IdentityCell() if engine.shadows else None
                decision, remembered = engine.decide_remembered(attrs, now, cell)
            ev = Evaluation(decision, attrs, engine.policy, None, (), None, "", remembered)
        except Exception as e:
            log_internal_error("internal error while deciding; denying", e)
            self.telemetry.metrics.internal_errors.inc()
            return Evaluation(INTERNAL, attrs, engine.policy, e)
        if cell is not None or candidate is not None:
            self._beside(ev, engine, candidate, now, cell)
        return ev

    @staticmethod
    def _beside(
        ev: Evaluation, engine: Engine, candidate: Engine | None, now: float, cell: IdentityCell | None
    ) -> None:
        """The shadow rules' and the candidate policy's decisions of the same request (same
        attributes, same instant, same verified identity). They never change the answer: a
        failure here is logged and reported as theirs."""
        assert ev.attrs is not None
        if cell is not None:
            try:
                ev.shadow = engine.shadow(ev.attrs, now, ev.decision, cell)
            except Exception as e:
                log_internal_error("shadow evaluation failed", e)
                ev.shadow = tuple(
                    ShadowResult(r, t, "error", "internal_error", None) for r, t, _ in engine.shadows
                )
        if candidate is not None:
            try:
                ev.candidate = candidate.decide(ev.attrs, now)
            except Exception as e:
                log_internal_error("candidate evaluation failed", e)
                ev.candidate = INTERNAL
            ev.candidate_version = candidate.policy.version

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
        for policy in (self.policy, self.candidate_policy):
            if policy is None:
                continue
            if any(isinstance(i.keys, RemoteKeys) and not i.keys.is_fresh() for i in policy.issuers):
                await self._refresh_keys(policy, wait=60.0)

    def record(self, ev: Evaluation, decision_id: str, start_ns: int, *, explain: bool = False) -> None:
        try:
            tel = self.telemetry
            parent = ids = None
            if ev.attrs is not None:
                if tel.tracing:
                    parent = tel.parent(ev.attrs.headers)
                else:
                    ids = trace_ids(ev.attrs.headers)
            tel.record(
                shadow=ev.shadow,
                candidate=ev.candidate,
                candidate_version=ev.candidate_version,
                decision=ev.decision,
                attrs=ev.attrs,
                decision_id=decision_id,
                policy_version=ev.policy.version,
                start_ns=start_ns,
                parent=parent,
                error=ev.error,
                explain=explain,
                ids=ids or ("", ""),
                remember=ev.remembered,
            )
        except Exception as e:
            log_internal_error("telemetry failed", e, decision_id=decision_id)


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
        self,
        path: Path,
        runtime: Runtime,
        interval: float,
        loader: Callable[[Path], Policy] | None = None,
        *,
        candidate: bool = False,
        read_stamp: tuple[Any, ...] | None = None,
    ):
        """`candidate`: watch the candidate policy (`serve --candidate`) rather than the active one.
        A missing candidate file means no candidate (promoting one is moving its file over the
        active policy's); a broken one is rejected like a broken policy, the last good one stays.
        `read_stamp`: the policy file's `file_stamp` from before the serving policy was read from
        it (the start-up load): a file replaced since then is loaded at the first check."""
        self.path = path
        self.runtime = runtime
        self.interval = interval
        self.candidate = candidate
        self.what = "candidate policy" if candidate else "policy"
        # The default: validate in a child process, compile here against the runtime's key store
        # (unchanged JWKS sources keep their keys, and verified tokens stay verified).
        self.loader = loader or functools.partial(load_isolated, keys=runtime.keys)
        self.last_error: str = ""
        self._stamp = self._fingerprint()
        if read_stamp is not None and self._stamp[:1] != (read_stamp,):
            self._stamp = ()  # replaced while it was being read (helper-19 F2): reload it
        self._lock = asyncio.Lock()
        self._requested = 0  # reload requests so far
        self._covered = 0  # requests a finished or running load has started after
        self._last_result = False

    def _fingerprint(self) -> tuple[Any, ...]:
        """Identity of the policy file and the JWKS files it names (a ConfigMap swaps all at once)."""
        stamp: list[Any] = []
        current = self.current()
        for f in (str(self.path), *(current.files if current is not None else ())):
            stamp.append(file_stamp(f))
        return tuple(stamp)

    def current(self) -> Policy | None:
        return self.runtime.candidate_policy if self.candidate else self.runtime.policy

    def _install(self, policy: Policy | None) -> None:
        if self.candidate:
            self.runtime.swap_candidate(policy)
        else:
            assert policy is not None
            self.runtime.swap(policy)

    def _count(self, result: str) -> None:
        m = self.runtime.telemetry.metrics
        (m.candidate_reloads if self.candidate else m.reloads).labels(result).inc()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()
            if not self.candidate:
                await self.runtime.refresh_stale_keys()

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
        loop = asyncio.get_running_loop()
        # Taken before reading: a change made while loading shows as a difference next time.
        stamp = self._fingerprint()
        replaced = self.current()
        old = replaced.version if replaced is not None else "none"
        if self.candidate and not self.path.exists():
            self._stamp = stamp
            self.last_error = ""
            if replaced is not None:
                self._install(None)
                self.runtime.keys.retain(self.runtime.key_providers())
                loop.run_in_executor(None, retire, [replaced])
                del replaced
                self._count("removed")
                log.info("candidate policy %s removed (its file is gone)", old)
            return True
        try:
            policy = await loop.run_in_executor(None, self.loader, self.path)
            # A reload refetches every JWKS it names: an operator's way to make keys the IdP
            # removed stop verifying at once (an unchanged set keeps its tokens verified).
            policy = await loop.run_in_executor(
                None, functools.partial(prime, policy, self.runtime.keys, refetch=True)
            )
        except PolicyError as e:
            self._stamp = stamp
            self.last_error = str(e)
            self._count("rejected")
            log.error("%s reload rejected; keeping %s:\n%s", self.what, old, e)
            return False
        except Exception as e:
            self._stamp = stamp
            self.last_error = type(e).__name__
            self._count("rejected")
            log_internal_error(f"{self.what} reload failed; keeping {old}", e)
            return False
        self._install(policy)
        self._stamp = stamp
        settle(policy, collect=True)
        self.runtime.keys.retain(self.runtime.key_providers())
        if replaced is not None:
            loop.run_in_executor(None, retire, [replaced])
        del replaced
        self.last_error = ""
        self._count("applied")
        log.info("%s reloaded: %s -> %s", self.what, old, policy.version)
        for w in policy.warnings:
            log.warning("%s: %s", self.what, w)
        return True
