"""Verified claims -> Identity (who is calling, how strongly they authenticated), per policy.

Claims come from a bearer token verified by the process-wide `tokens.Verifier`, or from Envoy's
`jwt_authn` metadata for issuers configured to trust it. Both get the same checks here, with the
policy's issuers, audiences, claim names, acr vocabulary and clock skew. Mapped identities are
remembered per policy (bounded), so the common call costs a dict lookup.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sidecar import reasons as R
from sidecar.assurance import IssuerAcr, level_from_claims
from sidecar.keys import KeyProvider
from sidecar.text import is_text
from sidecar.tokens import MAX_TOKEN_BYTES, AuthError, BoundedCache, Trust, Verified, Verifier

__all__ = ["MAX_TOKEN_BYTES", "AuthError", "ClaimNames", "Identity", "IdentityMapper", "IssuerConfig"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MEMO_SIZE = 10_000
MEMO_MAX_TTL = 300.0


@dataclass(frozen=True, slots=True)
class ClaimNames:
    subject: str = "sub"
    roles: str = "roles"
    groups: str = "groups"
    scopes: str = "scope"
    acr: str = "acr"
    amr: str = "amr"
    auth_time: str = "auth_time"


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    id: str
    issuer: str
    audiences: frozenset[str]
    algorithms: tuple[str, ...]
    keys: KeyProvider | None
    jwt_authn_payload: str | None
    claims: ClaimNames
    acr: IssuerAcr


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller. `credential` is "bearer", "jwt_authn" or "mtls" (workload only)."""

    credential: str
    principal: str = ""
    issuer_id: str = ""
    issuer: str = ""
    subject: str = ""
    roles: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    acr: tuple[str, ...] = ()
    amr: tuple[str, ...] = ()
    auth_time: int | None = None
    level: int | None = None
    level_source: str = ""

    @property
    def is_user(self) -> bool:
        return self.credential != "mtls"


class IdentityMapper:
    """One policy's reading of claims. Pure but for the bounded memo of mapped identities."""

    def __init__(
        self,
        issuers: tuple[IssuerConfig, ...],
        *,
        n_levels: int,
        amr_derivation: bool,
        skew: int,
        memo_size: int = MEMO_SIZE,
        memo_max_ttl: float = MEMO_MAX_TTL,
    ) -> None:
        self._by_iss = {i.issuer: i for i in issuers if i.keys is not None}
        self.trust: dict[str, Trust] = {
            i.issuer: Trust(i.issuer, i.algorithms, i.keys) for i in issuers if i.keys is not None
        }
        self._md_issuers = [i for i in issuers if i.jwt_authn_payload]
        self._md_keys = tuple(
            dict.fromkeys(i.jwt_authn_payload for i in self._md_issuers if i.jwt_authn_payload)
        )
        self._n_levels = n_levels
        self._amr_derivation = amr_derivation
        self._skew = skew
        self._max_ttl = memo_max_ttl
        # token -> (identity, its verification, the instant its times were checked at)
        self._memo: BoundedCache[tuple[Identity, Verified, float]] = BoundedCache(memo_size)

    # -- jwt_authn metadata ----------------------------------------------------------------

    def from_jwt_authn(self, metadata: Mapping[str, Any], principal: str, now: float) -> Identity | None:
        """Claims that Envoy's jwt_authn verified, for issuers configured to trust them."""
        for key in self._md_keys:
            claims = metadata.get(key)
            if claims is None:
                continue
            if not isinstance(claims, dict):
                raise AuthError(R.MALFORMED_TOKEN, "jwt_authn payload is not an object")
            iss = claims.get("iss")
            if not isinstance(iss, str):
                raise AuthError(R.INVALID_CLAIM, "the token has no string 'iss'")
            for cfg in self._md_issuers:
                if cfg.jwt_authn_payload == key and cfg.issuer == iss:
                    # Envoy checked the signature; the claims get every other check a bearer
                    # token gets (jwt_authn may be configured with other audiences or none).
                    self._check_audience(cfg, claims)
                    self._check_times(claims, now)
                    return self._identity(cfg, claims, "jwt_authn", principal, now)
            raise AuthError(R.UNKNOWN_ISSUER, "the token's issuer is not trusted")
        return None

    # -- bearer tokens ----------------------------------------------------------------------

    def from_bearer(self, token: str, verifier: Verifier, principal: str, now: float) -> Identity:
        """A bearer token: verified (or found verified) by `verifier`, then read by this policy."""
        hit = self._memo.get(token, now)
        if hit is not None:
            ident, verified, since = hit
            # Still verified by the keys its issuer serves now (a JWKS refresh that dropped its
            # key revokes it), and not asked about an earlier instant than the one its times
            # were checked at (nbf, iat and auth_time hold from then on, not before).
            if now >= since and verified.current():
                verifier.note_hit()
                return ident if ident.principal == principal else replace(ident, principal=principal)
        verified = verifier.verify(token, self.trust, now)
        cfg = self._by_iss[verified.issuer]
        claims = verified.claims
        self._check_audience(cfg, claims)
        exp = self._check_times(claims, now)
        ident = self._identity(cfg, claims, "bearer", principal, now)
        self._memo.put(
            token, (ident, verified, now), min(exp + self._skew, now + self._max_ttl), _cost(token, ident)
        )
        return ident

    @staticmethod
    def _check_audience(cfg: IssuerConfig, claims: Mapping[str, Any]) -> None:
        if not cfg.audiences:
            return
        aud = claims.get("aud")
        if isinstance(aud, str):
            ok = aud in cfg.audiences
        elif isinstance(aud, list):
            if not all(isinstance(a, str) for a in aud):  # RFC 7519 §4.1.3: strings
                raise AuthError(R.INVALID_CLAIM, "'aud' holds something other than strings")
            ok = any(a in cfg.audiences for a in aud)
        elif aud is None:
            ok = False
        else:
            raise AuthError(R.INVALID_CLAIM, "'aud' is neither a string nor a list")
        if not ok:
            raise AuthError(R.WRONG_AUDIENCE, "the token is not meant for this audience")

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float:
        skew = self._skew
        exp = claims.get("exp")
        if not _is_number(exp):
            raise AuthError(R.INVALID_CLAIM, "the token has no valid 'exp'")
        assert isinstance(exp, int | float)
        if now > exp + skew:
            raise AuthError(R.TOKEN_EXPIRED, "the token has expired")
        nbf = claims.get("nbf")
        if nbf is not None and not _is_number(nbf):
            raise AuthError(R.INVALID_CLAIM, "the token's 'nbf' is not a valid time")
        if nbf is not None and nbf > now + skew:
            raise AuthError(R.TOKEN_NOT_YET_VALID, "the token is not valid yet")
        iat = claims.get("iat")
        if iat is not None and not _is_number(iat):
            raise AuthError(R.INVALID_CLAIM, "the token's 'iat' is not a valid time")
        if iat is not None and iat > now + skew:
            raise AuthError(R.TOKEN_ISSUED_IN_FUTURE, "the token's 'iat' lies in the future")
        return float(exp)

    def _identity(
        self, cfg: IssuerConfig, claims: Mapping[str, Any], credential: str, principal: str, now: float
    ) -> Identity:
        names = cfg.claims
        sub = _claim(claims, names.subject)
        if not isinstance(sub, str) or not sub or not is_text(sub) or _CONTROL.search(sub):
            # The subject goes to the upstream in a header: text without control characters.
            raise AuthError(R.INVALID_CLAIM, f"the token has no valid string '{names.subject}'")
        acr = _strings(claims, names.acr, "acr")
        amr = _strings(claims, names.amr, "amr")
        auth_time = _claim(claims, names.auth_time)
        if auth_time is not None:
            if not _is_number(auth_time):
                raise AuthError(R.INVALID_CLAIM, "'auth_time' is not a number")
            if auth_time > now + self._skew:
                raise AuthError(R.INVALID_CLAIM, "'auth_time' lies in the future")
            auth_time = int(auth_time)
        level, how = level_from_claims(acr, amr, cfg.acr, self._n_levels, self._amr_derivation)
        return Identity(
            credential=credential,
            principal=principal,
            issuer_id=cfg.id,
            issuer=cfg.issuer,
            subject=sub,
            roles=frozenset(_strings(claims, names.roles, "roles")),
            groups=frozenset(_strings(claims, names.groups, "groups")),
            scopes=frozenset(_strings(claims, names.scopes, "scope", split=True)),
            acr=acr,
            amr=amr,
            auth_time=auth_time,
            level=level,
            level_source=how,
        )


def _cost(token: str, ident: Identity) -> int:
    """An upper estimate of what one entry holds: the token, the identity and its strings."""
    strings = sum(len(x) for x in (*ident.roles, *ident.groups, *ident.scopes, *ident.acr, *ident.amr))
    n = len(ident.roles) + len(ident.groups) + len(ident.scopes) + len(ident.acr) + len(ident.amr)
    return 2 * len(token) + 2 * (len(ident.subject) + len(ident.issuer) + strings) + 80 * n + 1024


_MAX_TIME = 2**53  # beyond this a JSON number is no time: float arithmetic would fail or round


def _is_number(v: object) -> bool:
    """A JSON number usable as a time: not a bool, not NaN or +-Infinity (json.loads accepts them),
    and small enough for float arithmetic (json.loads makes 1e400-sized integers exactly)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -_MAX_TIME < v < _MAX_TIME
    return isinstance(v, float) and math.isfinite(v) and -_MAX_TIME < v < _MAX_TIME


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    if path in claims:
        return claims[path]
    cur: Any = claims
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _strings(claims: Mapping[str, Any], path: str, what: str, *, split: bool = False) -> tuple[str, ...]:
    """A claim as values: a string is one value (only `scope` is space-separated, RFC 6749 §3.3),
    a list of strings its values; anything else is an invalid claim."""
    v = _claim(claims, path)
    if v is None:
        return ()
    if isinstance(v, str) and is_text(v):
        return tuple(x for x in v.split(" ") if x) if split else (v,)
    if isinstance(v, list) and all(isinstance(x, str) and is_text(x) for x in v):
        return tuple(v)
    raise AuthError(R.INVALID_CLAIM, f"'{what}' has the wrong type")
