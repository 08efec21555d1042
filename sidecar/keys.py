"""Verification keys: JWKS files and https URLs (fetched with limits), and the process-wide KeyStore.

Every signing key must be usable by its issuer: RSA keys of at least 2048 bits for an allowed
RS*/PS* algorithm, EC keys on the curve of an allowed ES* algorithm (P-256, P-384, P-521),
Ed25519/Ed448 keys for an allowed EdDSA. A key whose own `alg` member is not among the issuer's
algorithms (or does not fit the key) is refused the same way, rather than ignored: it could never
verify a token the issuer accepts, so in a file it is a mistake to point out (a missing entry in
`algorithms`, or a stale key), and from a URL it is dropped with a warning. Keys whose `use` is not
`sig`, and keys of a type joserfc does not know (RFC 7517 section 5), are skipped silently.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import cachetools
from joserfc.jwk import ECKey, JWKRegistry, Key, KeySet, OKPKey, RSAKey

log = logging.getLogger("stepup.jwks")

Fetcher = Callable[[str, float], bytes]
"""fetch(url, timeout_seconds) -> body bytes; raises on any failure."""

MAX_JWKS_BYTES = 1 << 20
MIN_RSA_BITS = 2048

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVE_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_SIGNING_CURVES = frozenset({"Ed25519", "Ed448"})


class KeyProvider(Protocol):
    def keyset(self) -> KeySet | None:
        """The keys to verify with now (possibly stale), or None if none were ever loaded."""

    def refresh(self) -> bool:
        """Try to fetch new keys (blocking); False when rate-limited, unchanged or failed."""

    def may_refresh(self) -> bool:
        """Whether a refresh would be attempted now (not rate-limited, refreshable at all)."""


@dataclass(frozen=True, slots=True)
class Jwks:
    """A parsed JWKS: the signing keys the issuer may verify with (possibly none), and one message
    per signing key refused, e.g. "keys[0] (kid 'x'): RSA key of 1024 bits; at least 2048 are
    required"."""

    keys: KeySet
    refused: tuple[str, ...]


def parse_jwks(data: bytes | str | dict[str, Any], algorithms: Collection[str]) -> Jwks:
    """Parse a JWKS document for an issuer allowing `algorithms`. Raises ValueError when the document
    is not a JWKS, holds a symmetric or private key (the whole set is then suspect), or holds no
    signing key at all; a signing key the issuer cannot use is listed in `refused` instead."""
    doc = json.loads(data) if isinstance(data, bytes | str) else data
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document: expected an object with a 'keys' list")
    allowed = frozenset(algorithms)
    keys: list[Key] = []
    refused: list[str] = []
    signing = 0
    for i, k in enumerate(doc["keys"]):
        if not isinstance(k, dict):
            raise ValueError(f"keys[{i}] is not an object")
        kty = k.get("kty")
        if kty == "oct":
            raise ValueError(f"keys[{i}] is a symmetric key: only public keys may verify tokens")
        if any(p in k for p in ("d", "p", "q")):
            raise ValueError(f"keys[{i}] contains private key material")
        if k.get("use", "sig") != "sig" or (isinstance(kty, str) and kty not in JWKRegistry.key_types):
            continue
        signing += 1
        problem, key = _import(k, allowed)
        if key is not None:
            keys.append(key)
        else:
            kid = k.get("kid")
            place = f"keys[{i}] (kid {kid!r})" if isinstance(kid, str) else f"keys[{i}] (no kid)"
            refused.append(f"{place}: {problem}")
    if not signing:
        raise ValueError("the JWKS holds no signing key")
    return Jwks(KeySet(keys), tuple(refused))


def _import(k: dict[str, Any], allowed: frozenset[str]) -> tuple[str, Key | None]:
    """The key, or why the issuer cannot use it."""
    # The modulus is measured before joserfc sees the key: it warns on importing a weak one.
    if k.get("kty") == "RSA":
        bits = _modulus_bits(k.get("n"))
        if bits is None:
            return "invalid key: 'n' is not a base64url string", None
        if bits < MIN_RSA_BITS:
            return f"RSA key of {bits} bits; at least {MIN_RSA_BITS} are required", None
    try:
        key = JWKRegistry.import_key(k)
    except Exception as e:
        return f"invalid key: {str(e)[:100] or type(e).__name__}", None
    problem = _unusable(key, k.get("alg"), allowed)
    return (problem, None) if problem else ("", key)


def _modulus_bits(n: object) -> int | None:
    if not isinstance(n, str):
        return None
    try:
        raw = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    except (binascii.Error, ValueError):
        return None
    return int.from_bytes(raw, "big").bit_length()


def _unusable(key: Key, alg: object, allowed: frozenset[str]) -> str | None:
    """Why the issuer could never verify a token with `key` (whose `alg` member is `alg`), or None."""
    fits: frozenset[str]
    if isinstance(key, RSAKey):
        if key.raw_value.key_size < MIN_RSA_BITS:  # `n` was read leniently before import
            return f"RSA key of {key.raw_value.key_size} bits; at least {MIN_RSA_BITS} are required"
        what, fits, needs = "an RSA key", _RSA_ALGS, "an RS* or PS* algorithm"
    elif isinstance(key, ECKey):
        curve_alg = _EC_CURVE_ALGS.get(key.curve_name)
        what, needs = f"an EC key on curve {key.curve_name}", str(curve_alg)
        fits = frozenset((curve_alg,)) if curve_alg else frozenset()
    elif isinstance(key, OKPKey):
        what, needs = f"an OKP key on curve {key.curve_name}", "EdDSA"
        fits = frozenset(("EdDSA",)) if key.curve_name in _OKP_SIGNING_CURVES else frozenset()
    else:  # pragma: no cover - symmetric keys are refused before
        return "not a public key"
    names = ", ".join(sorted(allowed))
    if not fits:
        return f"{what} cannot verify any supported signature algorithm"
    if alg is not None:
        if alg not in fits:
            return f"its alg {alg!r} does not fit {what}"
        if alg not in allowed:
            return f"its alg {alg!r} is not among the issuer's algorithms ({names})"
    elif fits.isdisjoint(allowed):
        return f"{what} needs {needs}, which the issuer does not allow (algorithms: {names})"
    return None


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


# --- fetching ----------------------------------------------------------------------------------
_NOT_IN_REQUEST = re.compile(r"[^\x21-\x7e]")


def urllib_fetch(
    url: str, timeout: float, *, max_bytes: int = MAX_JWKS_BYTES, ssl_context: ssl.SSLContext | None = None
) -> bytes:
    """GET `url` (https, or http where the policy allows it) and return its body: the whole exchange
    (connect, TLS handshake, request, headers and body) within `timeout` seconds of wall-clock time,
    and a body of at most `max_bytes`. Raises on any failure: TimeoutError past the deadline,
    ValueError for a redirect, a status other than 200 or a body over the limit, OSError and
    http.client errors for the connection. Name resolution uses the system resolver and its own
    timeouts. Proxy environment variables are not used.

    Redirects are never followed, not even to https on the same host: a JWKS URL is configured, not
    discovered, and a redirect would extend trust to wherever the server points: an open redirect on
    the IdP's host, or, where one host serves many tenants by path (Keycloak realms, Entra ID
    tenants), another tenant's keys. A 3xx answer is a failure naming its Location, so that the
    operator can configure that URL if it is the right one.

    The deadline is kept by giving every socket call only the time left (a TLS read or handshake
    call keeps its timeout as a deadline across its internal waits), so a server dripping a byte a
    second, in the headers or the body, is cut off at the deadline.
    """
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    if _NOT_IN_REQUEST.search(target + host_header):
        raise ValueError(f"the URL cannot be sent as a request: {url!r}")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\n"
        "Accept-Encoding: identity\r\nUser-Agent: stepup-sidecar\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        sock = _connect(parts.hostname, port, deadline)
        try:
            if parts.scheme == "https":
                sock = (ssl_context or _default_tls()).wrap_socket(
                    sock, server_hostname=parts.hostname, do_handshake_on_connect=False
                )
                sock.settimeout(_time_left(deadline))
                sock.do_handshake()
            sock.settimeout(_time_left(deadline))
            sock.sendall(request)
            return _read_response(sock, deadline, max_bytes)
        finally:
            sock.close()
    except TimeoutError:
        raise TimeoutError(f"no complete answer within {timeout:g} s") from None


def _read_response(sock: socket.socket, deadline: float, max_bytes: int) -> bytes:
    resp = http.client.HTTPResponse(cast(socket.socket, _DeadlineSocket(sock, deadline)), method="GET")
    try:
        resp.begin()
        if 300 <= resp.status < 400:
            location = resp.getheader("location", "")
            raise ValueError(
                f"answered {resp.status} redirecting to {location[:200]!r}: redirects are not followed"
                " (configure the final URL if it is trusted)"
            )
        if resp.status != 200:
            raise ValueError(f"answered {resp.status} {resp.reason[:100]}")
        if resp.length is not None and resp.length > max_bytes:
            raise ValueError(f"the answer is {resp.length} bytes, larger than the {max_bytes}-byte limit")
        body = bytearray()
        while chunk := resp.read(64 * 1024):
            body += chunk
            if len(body) > max_bytes:
                raise ValueError(f"the answer is larger than the {max_bytes}-byte limit")
        return bytes(body)
    finally:
        resp.close()


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to the first address of `host` that accepts one before the deadline."""
    error: OSError = OSError(f"{host!r} has no address")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_time_left(deadline))
            sock.connect(addr)
        except OSError as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise
            error = e
            continue
        return sock
    raise error


@functools.cache
def _default_tls() -> ssl.SSLContext:
    return ssl.create_default_context()


class _DeadlineSocket:
    """What http.client.HTTPResponse needs of a socket (`makefile`), reading under the deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._raw = _DeadlineReader(sock, deadline)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self._raw)


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)


REFETCH_SKIP = 2.0  # seconds: a reload does not refetch a JWKS fetched this recently


class RemoteKeys:
    """A JWKS URL. Fresh keys are cached (cachetools TTL) for `ttl` seconds; past that the last good
    set keeps verifying while a refresh is due. Fetches (periodic or for an unknown `kid`) happen at
    most once per `min_interval` seconds, so a flood of made-up `kid`s cannot hammer the IdP.

    A fetched set's keys that the issuer cannot use (see the module docstring) are dropped with a
    warning; a set with no usable key left is a failed fetch, and the last good keys keep serving."""

    def __init__(
        self,
        url: str,
        *,
        algorithms: Collection[str],
        fetch: Fetcher = urllib_fetch,
        ttl: float = 600.0,
        min_interval: float = 30.0,
        timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._algorithms = frozenset(algorithms)
        self._fetch = fetch
        self._timeout = timeout
        self._min_interval = min_interval
        self._clock = clock
        self._fresh: cachetools.TTLCache[str, KeySet] = cachetools.TTLCache(maxsize=1, ttl=ttl, timer=clock)
        self._last_good: KeySet | None = None
        self._last_raw: bytes | str | None = None  # the JWKS document _last_good came from
        self.fetched_at = 0.0  # when that document was fetched (clock), 0: never
        self._last_attempt = float("-inf")
        self._lock = threading.Lock()
        self.fetches = 0  # fetches that brought usable keys
        self.fetch_failures = 0
        self.last_error = ""

    def keyset(self) -> KeySet | None:
        """The last good key set (still served once it is no longer fresh). The same object until a
        fetch brings different keys: tokens verified under an older set are verified again."""
        return self._last_good

    def is_fresh(self) -> bool:
        return self._fresh.get("keys") is not None

    def seed_from(self, other: RemoteKeys) -> None:
        """Start from the document another provider of the same URL last fetched, filtered by this
        one's algorithms (a reload that changes only `algorithms` or the refresh interval must not
        leave the issuer with no keys until the IdP answers again, red-team F10). A new key set
        object: tokens verified under the other one are verified again, under these algorithms."""
        if other._last_raw is None:
            return
        try:
            jwks = parse_jwks(other._last_raw, self._algorithms)
        except ValueError:
            return
        if jwks.keys:  # _last_attempt stays: the reload's refetch is not skipped
            self._last_good, self._last_raw = jwks.keys, other._last_raw
            self.fetched_at = other.fetched_at

    def fetched_within(self, seconds: float) -> bool:
        return self._clock() - self._last_attempt < seconds

    def may_refresh(self) -> bool:
        return self._clock() - self._last_attempt >= self._min_interval

    def refresh(self, *, force: bool = False) -> bool:
        """Fetch the keys (at most once per `min_interval`, unless `force`: a policy reload)."""
        with self._lock:
            if not force and not self.may_refresh():
                return False
            self._last_attempt = self._clock()
            try:
                raw = self._fetch(self.url, self._timeout)
                jwks = parse_jwks(raw, self._algorithms)
                for problem in jwks.refused:
                    log.warning("jwks key dropped: %s", problem, extra={"jwks_url": self.url})
                if not jwks.keys:
                    raise ValueError(f"none of its {len(jwks.refused)} signing key(s) is usable")
            except Exception as e:
                self.fetch_failures += 1
                self.last_error = str(e)[:200]
                log.warning(
                    "jwks fetch failed; keeping %s",
                    "the cached keys" if self._last_good else "no keys",
                    extra={"jwks_url": self.url, "error": self.last_error},
                )
                return False
            self.last_error = ""
            self.fetches += 1
            keys = jwks.keys
            if self._last_good is not None and _same_keys(self._last_good, keys):
                keys = self._last_good  # unchanged: what it verified stays verified
            self._fresh["keys"] = keys
            self._last_good, self._last_raw = keys, raw
            self.fetched_at = self._clock()
            return True


def _same_keys(a: KeySet, b: KeySet) -> bool:
    def public(ks: KeySet) -> list[str]:
        return sorted(json.dumps(k.as_dict(private=False), sort_keys=True) for k in ks.keys)

    return public(a) == public(b)


class KeyFileError(ValueError):
    """A JWKS file that cannot serve: one message per problem (unreadable, not a JWKS, refused keys)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class KeyStore:
    """The process's verification keys: one provider per JWKS source, shared by every policy that
    names the same source. A reload gets back the same RemoteKeys for an unchanged URL (no refetch,
    and verified tokens stay valid) and the same StaticKeys for an unchanged file.

    Compiling a policy only asks for providers (files are read here; URLs are not fetched);
    `prime` fetches the URLs that never loaded, before the policy serves."""

    def __init__(self, fetch: Fetcher = urllib_fetch) -> None:
        self._fetch = fetch
        self._remote: dict[tuple[str, frozenset[str], float], RemoteKeys] = {}
        self._files: dict[tuple[str, frozenset[str]], tuple[tuple[int, int, int], StaticKeys]] = {}
        self._lock = threading.Lock()

    def remote(self, url: str, algorithms: Collection[str], ttl: float) -> RemoteKeys:
        key = (url, frozenset(algorithms), float(ttl))
        with self._lock:
            provider = self._remote.get(key)
            if provider is None:
                provider = RemoteKeys(url, algorithms=algorithms, fetch=self._fetch, ttl=ttl)
                same_url = [p for (u, _, _), p in self._remote.items() if u == url and p.fetched_at]
                if same_url:  # the newest document (one an older fetch had may hold a revoked key)
                    provider.seed_from(max(same_url, key=lambda p: p.fetched_at))
                self._remote[key] = provider
            return provider

    def file(self, path: str, algorithms: Collection[str]) -> StaticKeys:
        """The keys of a JWKS file (re-read only when the file changed); KeyFileError if unusable."""
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            key = (os.path.realpath(path), frozenset(algorithms))
            with self._lock:
                cached = self._files.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            with open(path, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)
        except OSError as e:
            raise KeyFileError([f"cannot read JWKS file {path!r}: {e.strerror}"]) from None
        try:
            if len(data) > MAX_JWKS_BYTES:
                raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            jwks = parse_jwks(data, algorithms)
        except ValueError as e:
            raise KeyFileError([f"bad JWKS in {path!r}: {e}"]) from None
        if jwks.refused:
            raise KeyFileError([f"bad JWKS in {path!r}: {problem}" for problem in jwks.refused])
        provider = StaticKeys(jwks.keys)
        with self._lock:
            self._files[key] = (stamp, provider)
        return provider

    def prime(self, providers: Collection[tuple[str, KeyProvider]], *, refetch: bool = False) -> list[str]:
        """Fetch every remote key set that never loaded (blocking; call from a worker thread), and
        with `refetch` (a policy reload) every one, so a reload picks up keys the IdP removed.
        `providers`: (issuer id, provider) pairs. Returns one warning per failure."""
        warnings = []
        for issuer_id, provider in providers:
            if not isinstance(provider, RemoteKeys):
                continue
            if refetch and provider.keyset() is not None:
                if provider.fetched_within(REFETCH_SKIP):
                    continue  # fetched a moment ago (by this very load): fresh enough
                if not provider.refresh(force=True):
                    warnings.append(
                        f"issuer {issuer_id!r}: JWKS {provider.url} could not be refetched"
                        f" ({provider.last_error}); its last good keys keep verifying"
                    )
                continue
            if provider.keyset() is None and not provider.refresh():
                warnings.append(
                    f"issuer {issuer_id!r}: JWKS {provider.url} could not be fetched"
                    f" ({provider.last_error or 'rate-limited'}); its tokens are refused until it can be"
                )
        return warnings

    def retain(self, providers: Collection[KeyProvider]) -> None:
        """Forget sources no policy in use names any more (bounded across many reloads)."""
        keep = {id(p) for p in providers}
        with self._lock:
            self._remote = {k: v for k, v in self._remote.items() if id(v) in keep}
            self._files = {k: v for k, v in self._files.items() if id(v[1]) in keep}

    def remotes(self) -> list[RemoteKeys]:
        with self._lock:
            return list(self._remote.values())
