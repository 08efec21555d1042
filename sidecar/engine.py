"""The decision pipeline, in one place (DESIGN.md §2):

request attributes -> operation lookup -> credentials -> identity + assurance -> permission table
-> sensitivity requirement (+ risk) -> Decision.

Pure: no I/O, no protobuf. The clock comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sidecar import reasons as R
from sidecar.assurance import Requirement, Shortfall, shortfall
from sidecar.attributes import RequestAttributes
from sidecar.decision import Decision, same_answer
from sidecar.identity import AuthError, Identity
from sidecar.paths import valid_method
from sidecar.policy import LevelSpec, Policy, SubjectView, VariantTables
from sidecar.reasons import Reason
from sidecar.tokens import Verifier


class Unverified(Exception):
    """A shadow evaluation needed a signature check that the answer did not make: shadow rules
    never cost one."""


class _CachedOnly:
    """A verifier that only finds tokens already verified (for shadow evaluations)."""

    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier

    def verify(self, token: str, trusted: Any, now: float) -> Any:
        hit = self._verifier.cached_verification(token, trusted, now)
        if hit is None:
            raise Unverified()
        return hit

    def note_hit(self) -> None:
        pass  # shadow evaluations are not cache traffic


class IdentityCell:
    """Who is calling, worked out once per Check and shared by the evaluations of that Check that
    read identities the same way (the answer and its shadow variants: same issuers, same cache)."""

    __slots__ = ("done", "error", "ident")

    def __init__(self) -> None:
        self.done = False
        self.ident: Identity | None = None
        self.error: AuthError | None = None

    def get(self, engine: Engine, a: RequestAttributes, now: float) -> Identity | None:
        if not self.done:
            # Unverified passes through without settling the cell: nothing is known yet.
            try:
                self.ident = engine._identify(a, now)
            except AuthError as e:
                self.error = e
            self.done = True
        if self.error is not None:
            raise self.error
        return self.ident


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """What a shadow rule would have answered, where it differs from the answer given."""

    rule: str
    table: str
    outcome: str  # allow, deny, step_up; "unknown" when it needed a token nobody verified
    reason: str
    decision: Decision | None


DECISION_CACHE = 4096  # allowed decisions remembered per policy (0: none)
_CACHE_KEY_CHARS = 4096  # a decision with a longer credential and path is not remembered
_VARIANTS = 4  # decisions per key (one per combination of risk rules firing; few in practice)


class Engine:
    """Decides one request against one policy."""

    def __init__(
        self, policy: Policy, verifier: Verifier | None = None, *, cache_size: int = DECISION_CACHE
    ) -> None:
        """`verifier`: the process's verified-token cache (shared by every policy); a private one
        when none is given. `cache_size`: allowed decisions remembered (see `decide`)."""
        self.policy = policy
        self._cache: dict[tuple[Any, ...], dict[tuple[bool, ...], tuple[Decision, float | None]]] = {}
        self._cache_size = max(0, cache_size)
        self._variants = min(_VARIANTS, self._cache_size)  # decisions one key may hold
        self._entries = 0  # decisions in the cache (a key holds one per combination of risk rules)
        self.cache_hits = 0  # allowed decisions reused
        self.cache_misses = 0  # Checks that could have been answered from the cache, decided instead
        self.verifier: Any = verifier if verifier is not None else Verifier()
        self._ids = policy.identities
        self._issuers = {i.id: i for i in policy.issuers}
        self._levels = policy.levels
        self.shadows: tuple[tuple[str, str, Engine], ...] = ()
        if policy.shadows:
            cached_only = _CachedOnly(self.verifier)
            self.shadows = tuple((s.rule_id, s.table, Engine(s.policy, verifier)) for s in policy.shadows)
            for _, _, eng in self.shadows:
                eng.verifier = cached_only

    def shadow(
        self, a: RequestAttributes, now: float, answer: Decision, cell: IdentityCell
    ) -> tuple[ShadowResult, ...]:
        """Each shadow rule's decision of this request, where it differs from `answer` (decided by
        this engine with `cell`). Never a signature check: a token the answer did not verify is
        verified by no shadow rule ("unknown")."""
        out = []
        if a.path_error or a.header_problem:
            return ()  # refused before any table is read: the same under every variant
        p = self.policy
        path = a.path if p.case_sensitive_paths else a.path.lower()
        readings = (path, path[:-1]) if len(path) > 1 and path[-1] == "/" else (path,)
        for rule, table, eng in self.shadows:
            if table != "risk":
                # A variant can differ only where its rule matches the operation (as the engine
                # reads it), or where the rule names a method the enforced tables do not.
                vt = eng.policy.tables
                assert isinstance(vt, VariantTables)
                if not (
                    any(vt.covers(table, rule, a.method, r) for r in readings)
                    or (a.method in vt.methods and a.method not in p.tables.methods)
                ):
                    continue
            try:
                d = eng.decide(a, now, cell)
            except Unverified:
                out.append(ShadowResult(rule, table, "unknown", "token_not_verified", None))
                continue
            if not same_answer(d, answer):
                out.append(ShadowResult(rule, table, d.outcome.value, d.reason, d))
        return tuple(out)

    def decide(self, a: RequestAttributes, now: float, cell: IdentityCell | None = None) -> Decision:
        """The decision of `a` at `now` (see `decide_remembered`)."""
        return self.decide_remembered(a, now, cell)[0]

    def decide_remembered(
        self, a: RequestAttributes, now: float, cell: IdentityCell | None = None
    ) -> tuple[Decision, bool]:
        """The decision of `a` at `now`, and whether the engine holds that very Decision object
        in its cache (then what the edges derive from it may be remembered with it too).

        Allowed decisions of a caller are remembered (per policy, so a reload starts afresh) and
        reused only where every input is the same: the key holds each request attribute the
        tables read (method, path, mTLS principal, the sensitivity context extension) and the
        credential, and under it one decision per combination of risk rules firing. Before a hit
        is reused, who is calling is worked out again as it would be (the token cache: expiry,
        nbf, revoked keys) and must be the identity a decision was made for (else the key goes);
        then the risk rules (hours, network, device) are evaluated now, and the login must still
        be fresh enough for the remembered requirement. What is reused is only what is a function
        of those: the table lookups, the requirement and the Decision. Refusals, public
        operations, requests with no credential or any problem, and shadow evaluations (`cell`)
        never touch the cache. At most `cache_size` decisions are held, the oldest keys go first."""
        if (
            cell is not None
            or not self._cache_size
            or not (a.bearer or a.jwt_authn or a.principal)  # nobody to remember a decision for
            or a.path_error
            or a.header_problem
            or a.method_override
            or a.auth_problem
            # Two readings, decided under both: the Decision carries only the first's freshness.
            or (len(a.path) > 1 and a.path[-1] == "/")
        ):
            return self._decide(a, now, cell), False
        p = self.policy
        if a.jwt_authn_bytes > _CACHE_KEY_CHARS:  # (its repr is longer still: not worth making)
            return self._decide(a, now, cell), False
        jwt = repr(a.jwt_authn) if a.jwt_authn else ""
        if len(a.bearer) + len(jwt) + len(a.path) + len(a.principal) > _CACHE_KEY_CHARS:
            return self._decide(a, now, cell), False
        ext = a.context_extensions.get(p.context_extension_key) if p.context_extension_key else None
        key = (a.method, a.path, a.principal, a.bearer, jwt, ext)
        variants = self._cache.get(key)  # whether each risk rule fires -> (decision, freshness)
        fired: tuple[bool, ...] | None = None
        if variants:
            # Who is calling, first (also for _decide on a miss): a credential that no longer
            # holds (expired, revoked keys) or another identity drops the key before any risk
            # rule is run for it.
            cell = IdentityCell()
            try:
                cell.ident = self._identify(a, now)
            except AuthError as e:
                cell.error = e
            cell.done = True
            ident = cell.ident
            if ident is None or not any(
                ident is d.identity or ident == d.identity for d, _ in variants.values()
            ):
                self._drop(key)
                variants = None
            else:
                fired = self._fired(a, now)
                hit = variants.get(fired)
                if hit is not None:
                    d, fresh_for = hit
                    if (ident is d.identity or ident == d.identity) and (  # (its principal too)
                        fresh_for is None  # else shortfall's freshness test, as it reads it
                        or ((auth := ident.auth_time) is not None and not now - auth > fresh_for)
                    ):
                        self.cache_hits += 1
                        return d, True
                    del variants[fired]
                    self._entries -= 1
        self.cache_misses += 1
        d = self._decide(a, now, cell)
        if not (d.allowed and d.identity is not None):  # only a caller's allowed call
            if variants is not None and not variants:
                self._drop(key)
            return d, False
        req = d.requirement
        fresh_for = req.max_age + p.skew if req is not None and req.max_age is not None else None
        if variants is None:
            variants = {}
        else:
            del self._cache[key]  # (put back last: the oldest keys go first)
            if len(variants) >= self._variants:
                self._entries -= len(variants)
                variants.clear()
        variants[fired if fired is not None else self._fired(a, now)] = (d, fresh_for)
        self._cache[key] = variants
        self._entries += 1
        while self._entries > self._cache_size:  # (never this key: it is last, and within the size)
            self._drop(next(iter(self._cache)))
        return d, True

    def _drop(self, key: tuple[Any, ...]) -> None:
        self._entries -= len(self._cache.pop(key))

    def _fired(self, a: RequestAttributes, now: float) -> tuple[bool, ...]:
        return tuple([r.condition.fires(a, now) for r in self.policy.risk_rules])

    def _decide(self, a: RequestAttributes, now: float, cell: IdentityCell | None) -> Decision:
        p = self.policy

        def refuse(r: Reason, text: str = "") -> Decision:
            return Decision(
                r.outcome, r.code, r.http_status, text or r.description, error=r.error, path=a.path
            )

        # 0. Malformed input is refused before anything reads it.
        if a.path_error:
            return refuse(R.INVALID_PATH, a.path_error)
        if a.header_problem:
            return refuse(R.INVALID_HEADER, a.header_problem)
        if not valid_method(a.method):
            return refuse(R.INVALID_METHOD)
        if a.method != a.method.upper() and a.method not in p.tables.methods:
            # Methods are case-sensitive, but Werkzeug, Django, Symfony and ASP.NET Core route
            # `delete` to the DELETE handler: a case variant the policy does not name is refused.
            upper = a.method.upper()
            return refuse(R.INVALID_METHOD, f"methods are case-sensitive: {a.method!r} is not {upper!r}")
        if a.method_override:
            # Rails, Symfony and Laravel run the method named by X-HTTP-Method-Override (or
            # `_method`) instead of POST: the operation would not be the one decided here.
            return refuse(R.INVALID_METHOD, "method override headers and `_method` are not accepted")
        if a.auth_problem == "ambiguous_credentials":
            return refuse(R.AMBIGUOUS_CREDENTIALS)

        # The operation as the upstream routes it (folded when it routes case-insensitively).
        path = a.path if p.case_sensitive_paths else a.path.lower()
        if len(path) > 1 and path[-1] == "/":
            # Frameworks disagree on a trailing slash (Express and Spring 5 route `/x/` to `/x`'s
            # handler; Go, Django and Werkzeug may have a handler of its own): allow only what
            # both readings allow, else answer with the first reading that does not.
            first = self._operation(a, path, now, cell)
            if not first.allowed:
                return first
            second = self._operation(a, path[:-1], now, cell)
            if not second.allowed:
                return second
            rules = tuple(dict.fromkeys((*first.matched_rules, *second.matched_rules)))
            return replace(first, matched_rules=rules)  # allowed under both: name both rules
        return self._operation(a, path, now, cell)

    def _operation(
        self, a: RequestAttributes, path: str, now: float, cell: IdentityCell | None
    ) -> Decision:
        """Steps 1 to 6 for one reading of the operation."""
        p = self.policy
        matched: list[str] = []
        sensitivity = ""
        rules = ["", ""]  # the sensitivity rule, the permission rule

        def out(r: Reason, text: str = "", **kw: Any) -> Decision:
            req: Requirement | None = kw.get("requirement")
            ident: Identity | None = kw.get("identity")
            return Decision(
                r.outcome,
                r.code,
                r.http_status,
                text or r.description,
                error=r.error,
                matched_rules=tuple(matched),
                sensitivity=sensitivity,
                path=a.path,
                required_assurance=self._name(req.min_level if req is not None else None),
                presented_assurance=self._name(ident.level if ident is not None else None),
                sensitivity_rule=rules[0],
                permission_rule=rules[1],
                **kw,
            )

        # 1. Which operation is this, and how sensitive? No rule: default deny.
        rule = p.tables.sensitivity(a.method, path)
        if rule is None:
            return out(R.NO_MATCHING_RULE)
        spec = p.sensitivity_levels[rule.level]
        matched.append(rule.id)
        rules[0] = rule.id
        sensitivity = rule.level
        if p.context_extension_key and p.context_extension_key in a.context_extensions:
            ext_name = a.context_extensions[p.context_extension_key]
            ext = p.sensitivity_levels.get(ext_name)
            if ext is None:
                return out(R.UNKNOWN_SENSITIVITY)
            merged = _stricter(spec, ext)
            if merged != spec:
                sensitivity = f"{rule.level}+{ext_name}"
                matched.append(f"context_extension:{ext_name}")
            spec = merged

        # 2. Public operations see no friction.
        if spec.public:
            return out(R.PUBLIC, requirement=Requirement(sensitivity, True, None, None, frozenset()))

        # 3. Who is calling? No credential: 401; a bad one: 401 invalid_token.
        try:
            ident = self._identify(a, now) if cell is None else cell.get(self, a, now)
        except AuthError as e:
            return out(e.reason, e.description)
        if ident is None:
            return out(R.MISSING_CREDENTIAL)

        # 4. May this subject call this operation at all? (No acr hints: step-up cannot fix it.)
        perm = p.tables.permission(a.method, path, subject_view(ident, a.principal))
        if not perm.granted:
            if not ident.is_user:  # a workload without a grant: an end-user token might have one
                return out(R.MISSING_CREDENTIAL, identity=ident)
            if perm.missing_scopes:
                return out(R.INSUFFICIENT_SCOPE, scope=perm.missing_scopes, identity=ident)
            return out(R.PERMISSION_DENIED, identity=ident)
        matched.append(perm.rule_id)
        rules[1] = perm.rule_id
        if perm.workload:
            # A workload's own call (no end-user token), granted by an mTLS-principal rule.
            return out(R.WORKLOAD_GRANTED, identity=ident)
        if not ident.is_user:
            # Granted by a rule that does not name principals (e.g. `anyone`), on an operation
            # that needs an end user's authentication: what is missing is a user token.
            return out(R.MISSING_CREDENTIAL, identity=ident)

        # 5. How strong and how fresh must the authentication be?
        req = self._requirement(spec, sensitivity, a, now)
        matched.extend(req.risk_rules)
        amr: tuple[str, ...] | frozenset[str] = ident.amr
        if req.required_amr and ident.issuer_id in self._issuers:
            implied = self._issuers[ident.issuer_id].acr.implied(ident.acr)
            if implied:
                amr = implied.union(ident.amr)  # an acr value that guarantees a method counts
        short = shortfall(req, ident.level, amr, ident.auth_time, now, p.skew)
        if short.any:
            return self._step_up(req, ident, short, out)

        # 6. Allow.
        return out(R.ALLOWED, requirement=req, identity=ident)

    # -- steps ------------------------------------------------------------------------------

    def _name(self, level: int | None) -> str:
        return self._levels[level] if level is not None else ""

    def _identify(self, a: RequestAttributes, now: float) -> Identity | None:
        ident = self._ids.from_jwt_authn(a.jwt_authn, a.principal, now) if a.jwt_authn else None
        if ident is not None:
            return ident
        if a.auth_problem == "malformed_token":
            raise AuthError(R.MALFORMED_TOKEN, "the bearer token is malformed")
        if a.bearer:
            return self._ids.from_bearer(a.bearer, self.verifier, a.principal, now)
        if a.principal:
            return Identity(credential="mtls", principal=a.principal)
        return None

    def _requirement(
        self, spec: LevelSpec, sensitivity: str, a: RequestAttributes, now: float
    ) -> Requirement:
        p = self.policy
        fired = [r for r in p.risk_rules if r.condition.fires(a, now)]
        min_level, max_age = spec.min_level, spec.max_age
        if fired:
            top = len(p.levels) - 1
            bump = max(r.raise_by for r in fired)
            if bump:
                min_level = min((min_level if min_level is not None else -1) + bump, top)
            caps = [r.max_age for r in fired if r.max_age is not None]
            if caps:
                max_age = min([*caps, *([max_age] if max_age is not None else [])])
        return Requirement(
            sensitivity, False, min_level, max_age, spec.required_amr, tuple(r.id for r in fired)
        )

    def _step_up(
        self, req: Requirement, ident: Identity, short: Shortfall, out: Callable[..., Decision]
    ) -> Decision:
        """One challenge that asks for everything that is short at once: acr values that meet the
        level and imply every required method (RFC 9470 has no parameter for methods), and
        max_age when the login is too old, so that one re-login satisfies it."""
        acr_values: tuple[str, ...] = ()
        if short.strength or short.missing_amr:
            issuer = self._issuers[ident.issuer_id]
            level = req.min_level if req.min_level is not None else 0
            acr_values = issuer.acr.askable(level, req.required_amr)
        max_age = req.max_age if short.freshness else None
        if short.strength:
            reason = R.ACR_TOO_LOW
        elif short.missing_amr:
            reason = R.AMR_MISSING
        else:
            reason = R.AUTH_TOO_OLD
        text = f"{reason.description}: {self._asked(req, short)}"
        return out(
            reason,
            text,
            requirement=req,
            identity=ident,
            acr_values=acr_values,
            max_age=max_age,
            required_amr=tuple(sorted(req.required_amr)) if short.strength or short.missing_amr else (),
        )

    def _asked(self, req: Requirement, short: Shortfall) -> str:
        """What the challenge asks, in plain words: "a phishing-resistant login with a security
        key within the last 5 minutes" (level words from assurance.describe, else the level)."""
        p = self.policy
        words = "a login"
        if (short.strength or short.missing_amr) and req.min_level is not None:
            described = p.describe[req.min_level] if p.describe else ""
            words = described or f"a login at level {p.levels[req.min_level]}"
        if (short.strength or short.missing_amr) and req.required_amr:
            names = [p.describe_amr.get(m, m) for m in sorted(req.required_amr)]
            words += " with " + " and ".join(names)
        if short.freshness and req.max_age is not None:
            words += f" within the last {_span(req.max_age)}"
        return words


def _span(seconds: int) -> str:
    """3600 -> "hour", 300 -> "5 minutes", 90 -> "90 seconds", 172800 -> "2 days"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return unit if n == 1 else f"{n} {unit}s"
    return "second" if seconds == 1 else f"{seconds} seconds"


def _stricter(a: LevelSpec, b: LevelSpec) -> LevelSpec:
    """Combine two levels so that the result asks at least what each asks."""

    def _max(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else max(x, y)

    def _min(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else min(x, y)

    return replace(
        a,
        public=a.public and b.public,
        min_level=_max(a.min_level, b.min_level),
        max_age=_min(a.max_age, b.max_age),
        required_amr=a.required_amr | b.required_amr,
    )


def subject_view(ident: Identity, principal: str) -> SubjectView:
    """What the permission table may look at of an identity."""
    if not ident.is_user:
        return SubjectView(False, "", "", frozenset(), frozenset(), frozenset(), principal)
    return SubjectView(
        True, ident.issuer_id, ident.subject, ident.roles, ident.groups, ident.scopes, principal
    )
