"""A compiled Policy and the permission and sensitivity tables it is made of: pure lookup, no I/O,
no protobuf.

Operation patterns are compiled at load into a segment trie, so a lookup walks the request path's
segments once (with at most three branches per segment: exact, `*`, `**`) whatever the number of
rules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from sidecar.paths import PathError, normalize_path, valid_method

if TYPE_CHECKING:
    from sidecar.identity import IdentityMapper, IssuerConfig
    from sidecar.risk import RiskRule

T = TypeVar("T")
ANY_METHOD = "*"
_STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
MEMO_PATH_MAX = 512  # longer paths are looked up every time, so the memo stays small in bytes
# Paths that are canonical as they stand: segments of unreserved characters, none starting with
# '.' (so no dot segment), no empty segment, no trailing '/'.
_PLAIN = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+")


@dataclass(frozen=True, slots=True)
class Pattern:
    """A parsed operation pattern: an HTTP method (or `*`) and path segments (`*`, `**` allowed)."""

    method: str
    segments: tuple[str, ...]
    text: str


class PatternError(ValueError):
    pass


# The common form: no method, plain segments (none a dot segment), perhaps a last `*` or `**`.
_SIMPLE = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+(?:/\*\*?)?|/\*\*?")


def parse_pattern(text: str) -> Pattern:
    """Parse `/pkg.Service/Method`, `/pkg.Service/*` or `METHOD /a/*/b/**`."""
    if _SIMPLE.fullmatch(text):  # (what _parse_pattern makes of it, in a third of the time)
        return Pattern(ANY_METHOD, tuple(text.split("/")[1:]), text)
    return _parse_pattern(text)


def _parse_pattern(text: str) -> Pattern:
    method, _, path = text.rpartition(" ")
    method = method.strip() or ANY_METHOD
    if method != ANY_METHOD:
        if not valid_method(method):
            raise PatternError(f"{method!r} is not an HTTP method")
        if method != method.upper() and method.upper() in _STANDARD_METHODS:
            raise PatternError(
                f"methods are case-sensitive (RFC 9110 §9.1): {method!r} would not match"
                f" {method.upper()!r}"
            )
    if not path.startswith("/"):
        raise PatternError("a pattern's path must start with '/'")
    segments = tuple(path.split("/")[1:])
    for i, seg in enumerate(segments):
        if seg == "**" and i != len(segments) - 1:
            raise PatternError("'**' may only be the last segment")
        if "*" in seg and seg not in ("*", "**"):
            raise PatternError(f"'*' must be a whole segment, not part of {seg!r}")
    literal = "/" + "/".join(s if "*" not in s else "x" for s in segments) if "*" in path else path
    if _PLAIN.fullmatch(literal):
        return Pattern(method, segments, text)  # plain segments, none a dot segment: canonical
    try:
        canonical = normalize_path(literal)
    except PathError as e:
        raise PatternError(f"path is not in canonical form: {e}") from None
    if canonical != literal:
        raise PatternError(f"path is not in canonical form (it would match as {canonical!r})")
    return Pattern(method, segments, text)


class _Node(Generic[T]):
    __slots__ = ("children", "dstar", "star", "terminal")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.star: _Node[T] | None = None
        self.dstar: dict[str, list[T]] | None = None
        self.terminal: dict[str, list[T]] | None = None


class OperationIndex(Generic[T]):
    """Maps operation patterns to values; finds the most specific match or all matches."""

    def __init__(self, cache_size: int = 8192) -> None:
        self._root: _Node[T] = _Node()
        self.methods: set[str] = set()  # the methods patterns name (not `*`)
        # Lookups are pure functions of (method, path): memoise the hot ones, bounded in entries
        # and, since only short keys are memoised, in bytes (methods are at most MAX_METHOD long).
        # The memos wrap functions of the root node, not bound methods: no reference cycle, so a
        # replaced policy is freed by reference counting (the policy's objects are frozen out of
        # the cyclic GC after a load, see runtime reloads).
        self._most_specific_memo = functools.lru_cache(maxsize=cache_size)(
            functools.partial(_most_specific, self._root)
        )
        self._all_matches_memo = functools.lru_cache(maxsize=cache_size)(
            functools.partial(_all_matches, self._root)
        )

    def add(self, pattern: Pattern, value: T) -> list[T]:
        """Add a value; returns the values already stored under the very same pattern. Call only
        while building (lookups are memoised)."""
        if pattern.method != ANY_METHOD:
            self.methods.add(pattern.method)
        node = self._root
        segs = pattern.segments
        for i, seg in enumerate(segs):
            if seg == "**" and i == len(segs) - 1:
                if node.dstar is None:
                    node.dstar = {}
                bucket = node.dstar.setdefault(pattern.method, [])
                break
            if seg == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                nxt = node.children.get(seg)
                if nxt is None:
                    nxt = node.children[seg] = _Node()
                node = nxt
        else:
            if node.terminal is None:
                node.terminal = {}
            bucket = node.terminal.setdefault(pattern.method, [])
        before = list(bucket)
        bucket.append(value)
        return before

    def dismantle(self) -> None:
        """Empty the trie node by node (for a replaced policy nobody uses any more): freeing a
        large trie in one reference-counting cascade holds the GIL for tens of milliseconds,
        this lets it go between nodes."""
        self._most_specific_memo.cache_clear()
        self._all_matches_memo.cache_clear()
        stack = [self._root]
        self._root = _Node()
        while stack:
            node = stack.pop()
            while node.children:
                stack.append(node.children.popitem()[1])
            if node.star is not None:
                stack.append(node.star)
                node.star = None
            node.terminal = node.dstar = None

    def most_specific(self, method: str, path: str) -> T | None:
        """The first value of the most specific pattern: exact segments beat `*`, `*` beats `**`,
        earlier segments weigh more, and an explicit method beats `*`."""
        if len(path) > MEMO_PATH_MAX or len(method) > MEMO_PATH_MAX:
            return _most_specific(self._root, method, path)
        return self._most_specific_memo(method, path)

    def all_matches(self, method: str, path: str) -> tuple[T, ...]:
        if len(path) > MEMO_PATH_MAX or len(method) > MEMO_PATH_MAX:
            return _all_matches(self._root, method, path)
        return self._all_matches_memo(method, path)


def _most_specific(root: _Node[T], method: str, path: str) -> T | None:
    for bucket in _walk(root, method, path.split("/")[1:]):
        return bucket[0]
    return None


def _all_matches(root: _Node[T], method: str, path: str) -> tuple[T, ...]:
    out: list[T] = []
    for bucket in _walk(root, method, path.split("/")[1:]):
        out.extend(bucket)
    return tuple(out)


def _walk(root: _Node[T], method: str, segs: list[str]) -> Iterator[list[T]]:
    """Iterative depth-first walk in specificity order."""
    stack: list[tuple[_Node[T], int, int]] = [(root, 0, 0)]
    n = len(segs)
    while stack:
        node, i, stage = stack.pop()
        if i == n:
            if stage == 0:
                stack.append((node, i, 1))
                if node.terminal:
                    yield from _by_method(node.terminal, method)
                continue
            if node.dstar:
                yield from _by_method(node.dstar, method)
            continue
        if stage == 0:
            stack.append((node, i, 1))
            child = node.children.get(segs[i])
            if child is not None:
                stack.append((child, i + 1, 0))
        elif stage == 1:
            stack.append((node, i, 2))
            if node.star is not None and segs[i] != "":
                stack.append((node.star, i + 1, 0))
        elif node.dstar:
            yield from _by_method(node.dstar, method)


def _by_method(buckets: dict[str, list[T]], method: str) -> Iterator[list[T]]:
    exact = buckets.get(method)
    if exact:
        yield exact
    elif method == "HEAD":
        # Frameworks (Express, Flask, Spring, Go's net/http) answer HEAD with the GET handler:
        # without a HEAD rule of its own, HEAD is decided under the GET rule it will run.
        get = buckets.get("GET")
        if get:
            yield get
    anym = buckets.get(ANY_METHOD)
    if anym:
        yield anym


# --- rules -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubjectView:
    """What the permission table may look at: the caller's identity, reduced to sets."""

    authenticated_user: bool
    issuer_id: str
    subject: str
    roles: frozenset[str]
    groups: frozenset[str]
    scopes: frozenset[str]
    principal: str


@dataclass(frozen=True, slots=True)
class PermissionRule:
    """A grant: every listed kind must match (AND), any value within a kind (OR)."""

    id: str
    anyone: bool = False
    issuers: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    principals_exact: frozenset[str] = frozenset()
    principals_prefix: tuple[str, ...] = ()
    workload_only: bool = field(default=False)

    def check(self, who: SubjectView) -> tuple[bool, bool]:
        """Return (granted, only_scope_missing)."""
        if self.anyone:
            return True, False
        if self.workload_only:
            # A rule naming only mTLS principals speaks for a workload acting on its own; with an
            # end-user token present, the user rules (and their assurance) govern.
            return (not who.authenticated_user and self._principal_ok(who.principal)), False
        if not who.authenticated_user:
            return False, False
        if self.issuers and who.issuer_id not in self.issuers:
            return False, False
        if self.users and who.subject not in self.users:
            return False, False
        if self.roles and self.roles.isdisjoint(who.roles):
            return False, False
        if self.groups and self.groups.isdisjoint(who.groups):
            return False, False
        if (self.principals_exact or self.principals_prefix) and not self._principal_ok(who.principal):
            return False, False
        if self.scopes and self.scopes.isdisjoint(who.scopes):
            return False, True
        return True, False

    def missing(self, who: SubjectView) -> tuple[str, ...]:
        """What keeps this rule from granting `who` (empty when it grants): the kinds that do not
        match, e.g. ("roles", "scopes"), or "user_token" / "no_user_token" / "principals"."""
        if self.anyone:
            return ()
        if self.workload_only:
            if who.authenticated_user:
                return ("no_user_token",)  # speaks for a workload acting on its own
            return () if self._principal_ok(who.principal) else ("principals",)
        if not who.authenticated_user:
            return ("user_token",)
        out = []
        if self.issuers and who.issuer_id not in self.issuers:
            out.append("issuers")
        if self.users and who.subject not in self.users:
            out.append("users")
        if self.roles and self.roles.isdisjoint(who.roles):
            out.append("roles")
        if self.groups and self.groups.isdisjoint(who.groups):
            out.append("groups")
        if (self.principals_exact or self.principals_prefix) and not self._principal_ok(who.principal):
            out.append("principals")
        if self.scopes and self.scopes.isdisjoint(who.scopes):
            out.append("scopes")
        return tuple(out)

    def _principal_ok(self, principal: str) -> bool:
        if not principal:
            return False
        if principal in self.principals_exact:
            return True
        return any(principal.startswith(p) for p in self.principals_prefix)


@dataclass(frozen=True, slots=True)
class SensitivityRule:
    id: str
    level: str


@dataclass(frozen=True, slots=True)
class PermissionResult:
    granted: bool
    rule_id: str = ""
    workload: bool = False
    missing_scopes: tuple[str, ...] = ()


class Tables:
    """The permission and sensitivity tables, compiled."""

    def __init__(
        self,
        sensitivity: OperationIndex[SensitivityRule],
        permissions: OperationIndex[PermissionRule],
    ) -> None:
        self._sensitivity = sensitivity
        self._permissions = permissions
        self.methods = frozenset(sensitivity.methods | permissions.methods)

    def dismantle(self) -> None:
        self._sensitivity.dismantle()
        self._permissions.dismantle()

    def sensitivity(self, method: str, path: str) -> SensitivityRule | None:
        return self._sensitivity.most_specific(method, path)

    def sensitivity_candidates(self, method: str, path: str) -> tuple[SensitivityRule, ...]:
        """Every sensitivity rule matching the operation, most specific first (the first wins)."""
        return self._sensitivity.all_matches(method, path)

    def permission_candidates(self, method: str, path: str) -> tuple[PermissionRule, ...]:
        """Every permission rule matching the operation, in the order they are tried."""
        return self._permissions.all_matches(method, path)

    def permission(self, method: str, path: str, who: SubjectView) -> PermissionResult:
        return _permission(self._permissions.all_matches(method, path), who)


class VariantTables(Tables):
    """The tables as if one shadow rule were enforced: lookups in the index of every rule (enforced
    and shadow) that pass over the other shadow rules. Only a shadow evaluation uses these."""

    def __init__(
        self,
        sensitivity: OperationIndex[SensitivityRule],
        permissions: OperationIndex[PermissionRule],
        skip_sensitivity: frozenset[str],
        skip_permissions: frozenset[str],
        methods: frozenset[str],
    ) -> None:
        self._sensitivity = sensitivity
        self._permissions = permissions
        self._skip_s = skip_sensitivity
        self._skip_p = skip_permissions
        self.methods = methods

    def sensitivity(self, method: str, path: str) -> SensitivityRule | None:
        for rule in self._sensitivity.all_matches(method, path):
            if rule.id not in self._skip_s:
                return rule
        return None

    def covers(self, table: str, rule_id: str, method: str, path: str) -> bool:
        """Whether a pattern of the rule `rule_id` of `table` matches the operation."""
        index: OperationIndex[SensitivityRule] | OperationIndex[PermissionRule] = (
            self._sensitivity if table == "sensitivity" else self._permissions
        )
        return any(r.id == rule_id for r in index.all_matches(method, path))

    def sensitivity_candidates(self, method: str, path: str) -> tuple[SensitivityRule, ...]:
        return tuple(r for r in self._sensitivity.all_matches(method, path) if r.id not in self._skip_s)

    def permission_candidates(self, method: str, path: str) -> tuple[PermissionRule, ...]:
        return tuple(r for r in self._permissions.all_matches(method, path) if r.id not in self._skip_p)

    def permission(self, method: str, path: str, who: SubjectView) -> PermissionResult:
        return _permission(self.permission_candidates(method, path), who)


def _permission(rules: tuple[PermissionRule, ...], who: SubjectView) -> PermissionResult:
    missing: list[str] = []
    for rule in rules:
        granted, scope_only = rule.check(who)
        if granted:
            return PermissionResult(True, rule.id, workload=rule.workload_only)
        if scope_only:
            missing.extend(s for s in sorted(rule.scopes) if s not in missing)
    return PermissionResult(False, missing_scopes=tuple(missing))


def build_index(
    entries: list[tuple[str, T]],
    on_error: Callable[[int, str], None],
    *,
    unique: Callable[[T], str] | None = None,
) -> OperationIndex[T]:
    """Compile (pattern text, value) pairs. `on_error(position, message)` collects problems; with
    `unique`, two values under the same pattern are an error naming both."""
    index: OperationIndex[T] = OperationIndex()
    for pos, (text, value) in enumerate(entries):
        try:
            pattern = parse_pattern(text)
        except PatternError as e:
            on_error(pos, f"pattern {text!r}: {e}")
            continue
        before = index.add(pattern, value)
        if unique is not None and before:
            on_error(
                pos, f"pattern {text!r} is also claimed by rule {unique(before[0])!r}: ties are not allowed"
            )
    return index


# --- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LevelSpec:
    """One sensitivity level of the policy."""

    name: str
    public: bool
    min_level: int | None
    max_age: int | None
    required_amr: frozenset[str]


@dataclass(frozen=True, slots=True)
class UpstreamHeaders:
    subject: str = "x-auth-subject"
    issuer: str = "x-auth-issuer"
    assurance: str = "x-auth-assurance"
    decision_id: str = "x-auth-decision-id"

    def names(self) -> tuple[str, ...]:
        return (self.subject, self.issuer, self.assurance, self.decision_id)


@dataclass(frozen=True)
class Policy:
    """A loaded, validated, compiled policy. Immutable: a reload builds a new one."""

    name: str
    version: str
    realm: str
    source: str
    levels: tuple[str, ...]
    skew: int
    tables: Tables
    sensitivity_levels: dict[str, LevelSpec]
    context_extension_key: str
    case_sensitive_paths: bool
    risk_rules: tuple[RiskRule, ...]
    issuers: tuple[IssuerConfig, ...]
    identities: IdentityMapper
    upstream_headers: UpstreamHeaders
    warnings: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # other files the policy was read from (JWKS), watched for changes
    # Enforced rule ids per table ("sensitivity", "permissions", "risk"), in file order (coverage).
    rule_ids: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # One variant of this policy per shadow rule: the policy as if that rule were enforced.
    shadows: tuple[Shadow, ...] = ()
    # Plain words for a step-up's error_description: per level (by index; "" for none), per method.
    describe: tuple[str, ...] = ()
    describe_amr: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Shadow:
    """A rule written with `mode: shadow`, and the policy as if it were enforced."""

    rule_id: str
    table: str  # "sensitivity", "permissions" or "risk"
    policy: Policy
