"""One canonical form of request paths and methods, shared by request handling and policy loading.

The sidecar decides on the operation the upstream will run and cannot change the path the
upstream receives. So it never resolves anything: a path that is not already canonical (dot
segments in any spelling, repeated slashes) is refused, and the only rewriting is the decoding
that every framework does before routing (percent-escapes of characters that may appear raw in a
path segment), so that two spellings of one operation always match the same rule.
"""

from __future__ import annotations

import re
import urllib.parse

MAX_PATH = 8192
MAX_METHOD = 32
MAX_ESCAPES = 512  # percent-escapes in one path (a 170-character non-ASCII name needs ~500)

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters that may stand raw in a path segment (RFC 3986 pchar: unreserved, sub-delims, ':' and
# '@') except ';', refused as path parameters (upstreams disagree on them): an escape of one of
# these is decoded, since frameworks decode it before routing.
_DECODED = _UNRESERVED | frozenset("!$&'()*+,=:@")
_HEX = frozenset("0123456789abcdefABCDEF")
# A raw path part: '/' then pchar characters (and '%' escapes), nothing else.
_RAW_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/%]*")  # used with fullmatch (no '$' before '\n')
# Controls and DEL are refused even in the query and fragment, which are otherwise ignored.
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# Escapes refused outright: controls, '/', '\\' (they change the path's structure once decoded),
# '%' (double encoding) and ';' (path parameters).
_FORBIDDEN_ESCAPES = frozenset([*range(0x00, 0x20), 0x7F, 0x2F, 0x5C, 0x25, 0x3B])
# RFC 9110 token characters (a method is a token).
_METHOD = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1," + str(MAX_METHOD) + "}")


class PathError(ValueError):
    """A path that is not canonical or cannot be decoded safely; `code` is a stable reason code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


_VALID_METHODS: dict[str, bool] = {}  # method -> valid_method's answer (a few methods repeat)


def valid_method(method: str) -> bool:
    """An RFC 9110 method token of at most MAX_METHOD characters (case is kept: `get` is not `GET`)."""
    ok = _VALID_METHODS.get(method)
    if ok is None:
        ok = _METHOD.fullmatch(method) is not None and method != "*"  # '*' is the policy's wildcard
        if len(method) <= 32:  # remembered: at most 256 short ones (emptied when full)
            if len(_VALID_METHODS) >= 256:
                _VALID_METHODS.clear()
            _VALID_METHODS[method] = ok
    return ok


def normalize_path(raw: str) -> str:
    """Return the operation path of a raw `:path`, or raise PathError.

    - query and fragment are dropped (only control characters are refused in them);
    - the path must be `/` followed by RFC 3986 path characters, `;` excepted;
    - escapes of characters that may stand raw (unreserved, sub-delims, `:`, `@`) are decoded;
      other escapes are kept with upper-case hex; `%2F`, `%5C`, `%25`, `%3B`, controls, malformed
      escapes and escapes that are not UTF-8 are refused;
    - dot segments (`.`, `..`, in any spelling) and empty segments (`//`) are refused, never
      resolved. A trailing `/` stays (frameworks differ on it: the engine decides such a path
      under both spellings, see `Engine.decide`).
    """
    if not raw or len(raw) > MAX_PATH:
        raise PathError("invalid_path", "empty or oversized path")
    cut = len(raw)
    q = raw.find("?")
    if q != -1:
        cut = q
    h = raw.find("#", 0, cut)
    if h != -1:
        cut = h
    path = raw[:cut]
    if cut != len(raw) and _CONTROL.search(raw, cut):
        raise PathError("invalid_path", "the query or fragment has control characters")
    if not _RAW_PATH.fullmatch(path):
        if path.startswith("/") and ";" in path:
            raise PathError("invalid_path", "path parameters (';') are not accepted")
        raise PathError("invalid_path", "path has characters outside RFC 3986")
    if "%" in path:
        path = _decode(path)
    if "/." in path or "//" in path:
        for seg in path.split("/")[1:-1]:
            if seg in ("", ".", ".."):
                raise PathError("invalid_path", "a dot segment or '//' (refused, not resolved)")
        last = path.rpartition("/")[2]
        if last in (".", ".."):
            raise PathError("invalid_path", "a dot segment (refused, not resolved)")
    return path


def _escape_table() -> dict[str, tuple[str, int] | None]:
    """Every two-character hex pair -> (its canonical text, its byte), or None when refused."""
    table: dict[str, tuple[str, int] | None] = {}
    for b in range(256):
        for h in {f"{b:02x}", f"{b:02X}", f"{b:02x}"[0] + f"{b:02X}"[1], f"{b:02X}"[0] + f"{b:02x}"[1]}:
            ch = chr(b)
            if b in _FORBIDDEN_ESCAPES:
                table[h] = None
            else:
                table[h] = (ch if ch in _DECODED else f"%{b:02X}", b)
    return table


_ESCAPES = _escape_table()


def _decode(path: str) -> str:
    """One step per escape, not per character (a path of 8 KB of escapes costs ~0.3 ms)."""
    parts = path.split("%")
    if len(parts) - 1 > MAX_ESCAPES:
        raise PathError("invalid_path", f"more than {MAX_ESCAPES} percent-escapes")
    out = [parts[0]]
    high = False
    for part in parts[1:]:
        entry = _ESCAPES.get(part[:2])
        if entry is None:
            if len(part) >= 2 and part[:2] in _ESCAPES:
                raise PathError("invalid_path", f"escaped character %{part[:2].upper()} is not accepted")
            raise PathError("invalid_path", "malformed percent-escape")
        out.append(entry[0])
        out.append(part[2:])
        high = high or entry[1] >= 0x80
    if high:
        try:
            urllib.parse.unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise PathError("invalid_path", "percent-escapes do not decode to valid UTF-8") from None
    return "".join(out)
