"""Credentials -> a verified Identity (who is calling, how strongly they authenticated).

Bearer JWTs are verified with joserfc against the issuer's keys; claims that Envoy's `jwt_authn`
filter already verified are taken from the CheckRequest's metadata for issuers configured to trust
it. Verified tokens are cached until they expire.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import (
    BadSignatureError,
    DecodeError,
    InvalidKeyIdError,
    JoseError,
    MissingAlgorithmError,
    UnsupportedAlgorithmError,
)

from sidecar import reasons as R
from sidecar.assurance import IssuerAcr, level_from_claims
from sidecar.jwks import KeyProvider
from sidecar.reasons import Reason

MAX_TOKEN_BYTES = 8 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CACHE_MAX_BYTES = 32 * 1024 * 1024  # the verified-token cache's budget (estimated bytes)


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


class AuthError(Exception):
    """A credential that does not verify, with its registered reason."""

    def __init__(self, reason: Reason, description: str = "") -> None:
        super().__init__(description or reason.description)
        self.reason = reason
        self.code = reason.code
        self.description = description or reason.description


class Authenticator:
    def __init__(
        self,
        issuers: tuple[IssuerConfig, ...],
        *,
        n_levels: int,
        amr_derivation: bool,
        skew: int,
        cache_size: int = 10_000,
        cache_max_ttl: float = 300.0,
    ) -> None:
        self._by_iss = {i.issuer: i for i in issuers if i.keys is not None}
        self._md_issuers = [i for i in issuers if i.jwt_authn_payload]
        self._md_keys = tuple(
            dict.fromkeys(i.jwt_authn_payload for i in self._md_issuers if i.jwt_authn_payload)
        )
        self._n_levels = n_levels
        self._amr_derivation = amr_derivation
        self._skew = skew
        self._max_ttl = cache_max_ttl

        self._cache = _TokenCache(cache_size)

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

    def from_bearer(self, token: str, principal: str, now: float) -> Identity:
        ident = self._cache.get(token, now)
        if ident is not None:
            return ident if ident.principal == principal else _with_principal(ident, principal)
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(R.MALFORMED_TOKEN, "token too large")
        header, unverified = _peek(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not isinstance(header.get("kid", ""), str):
            raise AuthError(R.MALFORMED_TOKEN, "the token's 'alg' or 'kid' is not a string")
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise AuthError(R.MALFORMED_TOKEN, "the token has no string 'iss'")
        cfg = self._by_iss.get(iss)
        if cfg is None:
            raise AuthError(R.UNKNOWN_ISSUER, "the token's issuer is not trusted")
        if alg not in cfg.algorithms:
            raise AuthError(R.DISALLOWED_ALGORITHM, "the token's algorithm is not allowed for its issuer")
        assert cfg.keys is not None
        keyset = cfg.keys.keyset()
        if keyset is None:
            raise AuthError(R.UNKNOWN_KEY, "no verification keys are available")
        try:
            obj = jws.deserialize_compact(token, keyset, algorithms=list(cfg.algorithms))
        except InvalidKeyIdError:
            raise AuthError(R.UNKNOWN_KEY, "the token's signing key is not known") from None
        except BadSignatureError:
            raise AuthError(R.BAD_SIGNATURE, "the token's signature does not verify") from None
        except (UnsupportedAlgorithmError, MissingAlgorithmError):
            raise AuthError(R.DISALLOWED_ALGORITHM, "the token's algorithm is not allowed") from None
        except DecodeError:
            raise AuthError(R.MALFORMED_TOKEN, "the token is not a well-formed JWS") from None
        except JoseError as e:  # any other refusal of the JWS by its form
            raise AuthError(R.MALFORMED_TOKEN, f"the token is not an acceptable JWS ({e.error})") from None
        except Exception:
            raise AuthError(R.MALFORMED_TOKEN, "the token could not be decoded") from None
        claims = _json(obj.payload)
        if not isinstance(claims, dict):
            raise AuthError(R.MALFORMED_TOKEN, "the token's payload is not a JSON object")
        if claims.get("iss") != cfg.issuer:
            raise AuthError(R.UNKNOWN_ISSUER, "the token's issuer is not trusted")
        self._check_audience(cfg, claims)
        exp = self._check_times(claims, now)
        ident = self._identity(cfg, claims, "bearer", principal, now)
        self._cache.put(token, ident, min(exp + self._skew, now + self._max_ttl))
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
        if not isinstance(sub, str) or not sub or not _utf8(sub) or _CONTROL.search(sub):
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


class _TokenCache:
    """Verified tokens -> Identity until they expire; bounded in entries and in bytes (a token is up
    to MAX_TOKEN_BYTES, and its claims are kept too), oldest evicted first. A plain dict: lookups
    sit on the hot path and must cost well under a microsecond."""

    def __init__(self, maxsize: int, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._bytes = 0
        self._d: dict[str, tuple[Identity, float, int]] = {}

    def get(self, token: str, now: float) -> Identity | None:
        hit = self._d.get(token)
        if hit is None:
            return None
        if now >= hit[1]:
            self._drop(token)
            return None
        return hit[0]

    def put(self, token: str, ident: Identity, expires: float) -> None:
        cost = _cost(token, ident)
        self._drop(token)
        while self._d and (len(self._d) >= self._maxsize or self._bytes + cost > self._max_bytes):
            self._drop(next(iter(self._d)))
        self._d[token] = (ident, expires, cost)
        self._bytes += cost

    def _drop(self, token: str) -> None:
        hit = self._d.pop(token, None)
        if hit is not None:
            self._bytes -= hit[2]

    @property
    def bytes(self) -> int:
        return self._bytes


def _cost(token: str, ident: Identity) -> int:
    """An upper estimate of what one entry holds: the token, the identity and its strings."""
    strings = sum(len(x) for x in (*ident.roles, *ident.groups, *ident.scopes, *ident.acr, *ident.amr))
    n = len(ident.roles) + len(ident.groups) + len(ident.scopes) + len(ident.acr) + len(ident.amr)
    return 2 * len(token) + 2 * (len(ident.subject) + len(ident.issuer) + strings) + 80 * n + 1024


def _with_principal(ident: Identity, principal: str) -> Identity:
    from dataclasses import replace

    return replace(ident, principal=principal)


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
    if isinstance(v, str) and _utf8(v):
        return tuple(x for x in v.split(" ") if x) if split else (v,)
    if isinstance(v, list) and all(isinstance(x, str) and _utf8(x) for x in v):
        return tuple(v)
    raise AuthError(R.INVALID_CLAIM, f"'{what}' has the wrong type")


def _utf8(s: str) -> bool:
    """Whether a JSON string is text: json.loads accepts lone surrogates ("\\ud800"), which no
    header, span or log line can carry."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


MAX_JSON_DEPTH = 64  # nesting of a token's header or payload (real claims nest a few levels)


def _json(raw: bytes | str) -> Any:
    """json.loads for untrusted input: strict UTF-8 (no byte-order mark, no surrogates smuggled
    in), nesting at most MAX_JSON_DEPTH; any failure is a malformed token."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
            raise ValueError("nested too deeply")
        return json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AuthError(R.MALFORMED_TOKEN, "the token is not well-formed JSON") from None


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects, brackets inside strings not counted (rare path:
    only for texts with many brackets)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _b64json(part: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise AuthError(R.MALFORMED_TOKEN, "the token is not a well-formed JWT") from None
    return _json(raw)


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read header and payload WITHOUT verifying, only to choose the issuer's keys."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError(R.MALFORMED_TOKEN, "the token is not a compact JWS (three parts)")
    header, payload = _b64json(parts[0]), _b64json(parts[1])
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise AuthError(R.MALFORMED_TOKEN, "the token is not a well-formed JWT")
    return header, payload
