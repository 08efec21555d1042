"""How strongly a caller authenticated, and what an operation requires of it.

Levels are indexes into the policy's ordered list (0 = weakest). A mapped `acr` decides the level;
without one, `amr` (RFC 8176) may derive the first or second level, never the top one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# RFC 8176 method values by authentication factor class. `user` (a presence test), `rba`, `geo`,
# `mca` and unknown values are no factor: they neither derive nor raise a level.
_KNOWLEDGE = frozenset({"pwd", "pin", "kba"})
_POSSESSION = frozenset({"hwk", "swk", "otp", "sms", "tel", "sc", "pop"})
_INHERENCE = frozenset({"fpt", "face", "iris", "retina", "vbm"})
_FACTORS = _KNOWLEDGE | _POSSESSION | _INHERENCE
# Plain words for RFC 8176 method values, for a step-up's error_description (a policy can add
# its own or override these under assurance.describe_amr).
AMR_WORDS = {
    "face": "facial recognition",
    "fpt": "a fingerprint",
    "geo": "a location check",
    "hwk": "a security key",
    "iris": "an iris scan",
    "kba": "a knowledge question",
    "mca": "several channels",
    "mfa": "several factors",
    "otp": "a one-time code",
    "pin": "a PIN",
    "pop": "a proof-of-possession key",
    "pwd": "a password",
    "rba": "a risk check",
    "retina": "a retina scan",
    "sc": "a smart card",
    "sms": "a code sent by SMS",
    "swk": "a software key",
    "tel": "a phone call",
    "user": "a presence check",
    "vbm": "a voice check",
    "wia": "Windows sign-in",
}
# OpenID Connect Core §2: acr "0" states that the authentication does NOT meet ISO/IEC 29115
# level 1 (e.g. a long-lived browser cookie): no level, and no derivation from amr either.
NO_ASSURANCE_ACR = "0"


_NO_METHODS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class IssuerAcr:
    """One issuer's acr vocabulary: which values prove which level, which to ask for, and which
    authentication methods a value guarantees (RFC 9470 has no parameter for methods: a required
    method is asked for through an acr value that implies it)."""

    accept: dict[str, int]
    # request[level] = acr values to ask for when `level` is required: that level's values, then
    # those of each stronger level (least friction first).
    request: tuple[tuple[str, ...], ...]
    implies: dict[str, frozenset[str]] = field(default_factory=dict)

    def implied(self, acr: Iterable[str]) -> frozenset[str]:
        """The methods the token's (accepted) acr values guarantee."""
        if not self.implies:
            return _NO_METHODS
        out: set[str] = set()
        for value in acr:
            out |= self.implies.get(value, _NO_METHODS)
        return frozenset(out)

    def askable(self, level: int, methods: frozenset[str]) -> tuple[str, ...]:
        """The acr values to ask for so that one login meets `level` and includes every method of
        `methods`: request[level] (least friction first), keeping only values that imply them."""
        values = self.request[level]
        if not methods:
            return values
        return tuple(v for v in values if methods <= self.implies.get(v, _NO_METHODS))


def build_issuer_acr(
    levels: tuple[str, ...],
    table: dict[str, tuple[list[str], list[str]]],
    implies: dict[str, frozenset[str]] | None = None,
) -> IssuerAcr:
    """`table[level] = (accept, request)`; levels missing from the table get no values.
    `implies[acr value] = methods` that a login at that value always includes."""
    accept: dict[str, int] = {}
    own: list[list[str]] = []
    for i, name in enumerate(levels):
        acc, req = table.get(name, ([], []))
        for value in acc:
            accept[value] = i
        own.append(list(req or acc))
    request: list[tuple[str, ...]] = []
    for i in range(len(levels)):
        seen: list[str] = []
        for j in range(i, len(levels)):
            seen.extend(v for v in own[j] if v not in seen)
        request.append(tuple(seen))
    return IssuerAcr(accept, tuple(request), dict(implies or {}))


def level_from_claims(
    acr: tuple[str, ...], amr: tuple[str, ...], vocab: IssuerAcr, n_levels: int, amr_derivation: bool
) -> tuple[int | None, str]:
    """Return (level, how): how is "acr", "amr" or "" when no level could be established."""
    best: int | None = None
    for value in acr:
        lvl = vocab.accept.get(value)
        if lvl is not None and (best is None or lvl > best):
            best = lvl
    if best is not None:
        return best, "acr"
    if not amr_derivation or not amr or NO_ASSURANCE_ACR in acr:
        return None, ""
    cap = n_levels - 2  # never the top level from amr alone
    if cap < 0:
        return None, ""
    methods = set(amr)
    classes = sum(1 for c in (_KNOWLEDGE, _POSSESSION, _INHERENCE) if not c.isdisjoint(methods))
    if "mfa" in methods or classes >= 2:
        return min(1, cap), "amr"
    if methods.isdisjoint(_FACTORS):
        return None, ""  # no authentication factor named at all
    return 0, "amr"


@dataclass(frozen=True, slots=True)
class Requirement:
    """What an operation demands, after risk rules."""

    sensitivity: str
    public: bool
    min_level: int | None
    max_age: int | None
    required_amr: frozenset[str]
    risk_rules: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Shortfall:
    strength: bool
    freshness: bool
    missing_amr: tuple[str, ...]

    @property
    def any(self) -> bool:
        return self.strength or self.freshness or bool(self.missing_amr)


def shortfall(
    req: Requirement, level: int | None, amr: Iterable[str], auth_time: int | None, now: float, skew: int
) -> Shortfall:
    strength = req.min_level is not None and (level is None or level < req.min_level)
    missing = tuple(sorted(req.required_amr.difference(amr))) if req.required_amr else ()
    fresh_short = False
    if req.max_age is not None:
        fresh_short = auth_time is None or now - auth_time > req.max_age + skew
    return Shortfall(strength, fresh_short, missing)
