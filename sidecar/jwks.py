"""Verification keys: a JWKS from a file, or from an https URL cached and refreshed with limits."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

import cachetools
from joserfc.jwk import KeySet

log = logging.getLogger("stepup.jwks")

Fetcher = Callable[[str, float], bytes]
"""fetch(url, timeout_seconds) -> body bytes; raises on any failure."""


class KeyProvider(Protocol):
    def keyset(self) -> KeySet | None:
        """The keys to verify with now (possibly stale), or None if none were ever loaded."""

    def refresh(self) -> bool:
        """Try to fetch new keys (blocking); False when rate-limited, unchanged or failed."""

    def may_refresh(self) -> bool:
        """Whether a refresh would be attempted now (not rate-limited, refreshable at all)."""


def parse_jwks(data: bytes | str | dict[str, Any]) -> KeySet:
    """Parse a JWKS document, keeping only public signing keys; raises ValueError on any problem."""
    doc = json.loads(data) if isinstance(data, bytes | str) else data
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document: expected an object with a 'keys' list")
    keys = []
    for i, k in enumerate(doc["keys"]):
        if not isinstance(k, dict):
            raise ValueError(f"keys[{i}] is not an object")
        if k.get("kty") == "oct":
            raise ValueError(f"keys[{i}] is a symmetric key: only public keys may verify tokens")
        if any(p in k for p in ("d", "p", "q")):
            raise ValueError(f"keys[{i}] contains private key material")
        if k.get("use", "sig") != "sig":
            continue
        keys.append(k)
    if not keys:
        raise ValueError("the JWKS holds no signing key")
    try:
        return KeySet.import_key_set({"keys": keys})
    except Exception as e:
        raise ValueError(f"invalid key: {e}") from None


class StaticKeys:
    """Keys read once from a file with the policy (reloaded with it)."""

    def __init__(self, keyset: KeySet) -> None:
        self._keys = keyset

    def keyset(self) -> KeySet | None:
        return self._keys

    def refresh(self) -> bool:
        return False

    def may_refresh(self) -> bool:
        return False


def urllib_fetch(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"accept": "application/json"})  # noqa: S310 (scheme checked at load)
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        body: bytes = resp.read(1 << 20)
        return body


class RemoteKeys:
    """A JWKS URL. Fresh keys are cached (cachetools TTL) for `ttl` seconds; past that the last good
    set keeps verifying while a refresh is due. Fetches (periodic or for an unknown `kid`) happen at
    most once per `min_interval` seconds, so a flood of made-up `kid`s cannot hammer the IdP."""

    def __init__(
        self,
        url: str,
        *,
        fetch: Fetcher = urllib_fetch,
        ttl: float = 600.0,
        min_interval: float = 30.0,
        timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._fetch = fetch
        self._timeout = timeout
        self._min_interval = min_interval
        self._clock = clock
        self._fresh: cachetools.TTLCache[str, KeySet] = cachetools.TTLCache(maxsize=1, ttl=ttl, timer=clock)
        self._last_good: KeySet | None = None
        self._last_attempt = float("-inf")
        self._lock = threading.Lock()
        self.fetch_failures = 0

    def keyset(self) -> KeySet | None:
        fresh = self._fresh.get("keys")
        return fresh if fresh is not None else self._last_good

    def is_fresh(self) -> bool:
        return self._fresh.get("keys") is not None

    def may_refresh(self) -> bool:
        return self._clock() - self._last_attempt >= self._min_interval

    def refresh(self) -> bool:
        with self._lock:
            if not self.may_refresh():
                return False
            self._last_attempt = self._clock()
            try:
                keys = parse_jwks(self._fetch(self.url, self._timeout))
            except Exception as e:
                self.fetch_failures += 1
                log.warning(
                    "jwks fetch failed; keeping %s",
                    "the cached keys" if self._last_good else "no keys",
                    extra={"jwks_url": self.url, "error": str(e)[:200]},
                )
                return False
            self._fresh["keys"] = keys
            self._last_good = keys
            return True
