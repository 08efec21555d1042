"""Bearer tokens -> verified claims: the JWS signature checked with joserfc against the keys an
issuer is trusted with, and the process-wide cache of verified tokens.

Verification is shared, interpretation is per policy: the cache maps a token to the claims whose
signature verified and to the key set that verified them. Every policy (the active one after a
reload, a candidate beside it) uses the same cache; a hit counts only if that policy trusts the
token's issuer with the very same key set and algorithm. What the claims mean (audiences, times,
roles, assurance) is decided per policy in `identity.py`, on every use.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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
from sidecar.keys import KeyProvider
from sidecar.reasons import Reason
from sidecar.text import SURROGATE_ESCAPE, all_text

MAX_TOKEN_BYTES = 8 * 1024
MAX_JSON_DEPTH = 64  # nesting of a token's header or payload (real claims nest a few levels)
CACHE_MAX_BYTES = 32 * 1024 * 1024  # the verified-token cache's budget (estimated bytes)
CACHE_MAX_TTL = 300.0  # seconds a verification is remembered at most (keys may be rotated)

V = TypeVar("V")


class AuthError(Exception):
    """A credential that does not verify, with its registered reason."""

    def __init__(self, reason: Reason, description: str = "") -> None:
        super().__init__(description or reason.description)
        self.reason = reason
        self.code = reason.code
        self.description = description or reason.description


@dataclass(frozen=True, slots=True)
class Trust:
    """What a policy trusts one issuer (its exact `iss`) with: these keys, these algorithms."""

    issuer: str
    algorithms: tuple[str, ...]
    keys: KeyProvider


@dataclass(frozen=True, slots=True)
class Verified:
    """A token whose signature verified: its claims, and the keys and algorithm that did it."""

    claims: dict[str, Any]
    issuer: str
    alg: str
    keys: KeyProvider
    keyset: Any  # the provider's key set that verified it: a refresh that changes it revokes this

    def current(self) -> bool:
        """Whether the key set that verified this token is still the one its provider serves (a
        JWKS refresh that dropped or changed keys makes every earlier verification stale)."""
        return self.keys.keyset() is self.keyset


class BoundedCache(Generic[V]):
    """key -> value until an expiry; bounded in entries and in (estimated) bytes, oldest evicted
    first. A plain dict: lookups sit on the hot path and must cost well under a microsecond."""

    def __init__(self, maxsize: int, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._bytes = 0
        self._d: dict[str, tuple[V, float, int]] = {}

    def get(self, key: str, now: float) -> V | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if now >= hit[1]:
            self._drop(key)
            return None
        return hit[0]

    def put(self, key: str, value: V, expires: float, cost: int) -> None:
        self._drop(key)
        while self._d and (len(self._d) >= self._maxsize or self._bytes + cost > self._max_bytes):
            self._drop(next(iter(self._d)))
        self._d[key] = (value, expires, cost)
        self._bytes += cost

    def _drop(self, key: str) -> None:
        hit = self._d.pop(key, None)
        if hit is not None:
            self._bytes -= hit[2]

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._d)


class Verifier:
    """Signature verification and the verified-token cache, one for the process."""

    def __init__(
        self,
        *,
        cache_size: int = 10_000,
        max_ttl: float = CACHE_MAX_TTL,
        max_bytes: int = CACHE_MAX_BYTES,
    ) -> None:
        self._cache: BoundedCache[Verified] = BoundedCache(cache_size, max_bytes)
        self._max_ttl = max_ttl
        self.verifications = 0  # signatures checked (cache misses that got that far)
        self.hits = 0  # tokens found verified (here or in a policy's identity memo, see note_hit)
        self.misses = 0  # tokens not found verified

    def note_hit(self) -> None:
        """A token found verified one level up (a policy's memo of identities)."""
        self.hits += 1

    def cached_verification(self, token: str, trusted: Mapping[str, Trust], now: float) -> Verified | None:
        """`token`'s verified claims if it was verified before under the keys `trusted` names for
        its issuer; None otherwise (nothing is checked here)."""
        hit = self._cache.get(token, now)
        if hit is not None:
            t = trusted.get(hit.issuer)
            if t is not None and t.keys is hit.keys and hit.alg in t.algorithms and hit.current():
                return hit
        return None

    def verify(self, token: str, trusted: Mapping[str, Trust], now: float, *, count: bool = True) -> Verified:
        """The verified claims of `token` for a policy trusting `trusted` (keyed by `iss`), or
        AuthError. The claims' meaning (audience, times, ...) is the caller's to check. `count`:
        whether the lookup counts as cache traffic (the candidate policy's do not)."""
        hit = self.cached_verification(token, trusted, now)
        if hit is not None:
            self.hits += count
            return hit
        # Not verified before, or under keys this policy does not trust the same way: verify.
        self.misses += count
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(R.MALFORMED_TOKEN, "token too large")
        header, unverified = _peek(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not isinstance(header.get("kid", ""), str):
            raise AuthError(R.MALFORMED_TOKEN, "the token's 'alg' or 'kid' is not a string")
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise AuthError(R.MALFORMED_TOKEN, "the token has no string 'iss'")
        t = trusted.get(iss)
        if t is None:
            raise AuthError(R.UNKNOWN_ISSUER, "the token's issuer is not trusted")
        if alg not in t.algorithms:
            raise AuthError(R.DISALLOWED_ALGORITHM, "the token's algorithm is not allowed for its issuer")
        keyset = t.keys.keyset()
        if keyset is None:
            raise AuthError(R.UNKNOWN_KEY, "no verification keys are available")
        self.verifications += 1
        try:
            obj = jws.deserialize_compact(token, keyset, algorithms=list(t.algorithms))
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
        if claims.get("iss") != t.issuer:
            raise AuthError(R.UNKNOWN_ISSUER, "the token's issuer is not trusted")
        verified = Verified(claims, t.issuer, alg, t.keys, keyset)
        # Remembered for max_ttl at most (the claims' times are checked on every use, by the
        # policy, with its own skew).
        self._cache.put(token, verified, now + self._max_ttl, 3 * len(token) + 1024)
        return verified

    @property
    def cached(self) -> int:
        return len(self._cache)


class Uncounted:
    """The process's verifier for a policy whose lookups are not cache traffic (the candidate's:
    the hit rate is the answers')."""

    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier

    def verify(self, token: str, trusted: Mapping[str, Trust], now: float) -> Verified:
        return self._verifier.verify(token, trusted, now, count=False)

    def note_hit(self) -> None:
        pass


def _json(raw: bytes | str) -> Any:
    """json.loads for untrusted input: strict UTF-8 (no byte-order mark, no surrogates smuggled
    in), nesting at most MAX_JSON_DEPTH; any failure is a malformed token."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
            raise ValueError("nested too deeply")
        data = json.loads(text)
        if "\\u" in text and SURROGATE_ESCAPE.search(text) and not all_text(data):
            # json.loads takes "\ud800" alone; a pair ("\ud83d\udd12") is one character.
            raise ValueError("a lone surrogate escape")
        return data
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
