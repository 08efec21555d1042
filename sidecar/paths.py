"""One canonical normalisation of request paths, shared by request handling and policy loading."""

from __future__ import annotations

import functools
import re

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Characters a raw :path may carry (RFC 3986 pchar, '/', '?', '#', '%'). Everything else, including
# controls, spaces, backslashes and any byte >= 0x80, is refused before any decoding.
_RAW_OK = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%?#]*")  # used with fullmatch (no '$' before '\n')
MAX_PATH = 8192
# Escapes that change the path's structure once an upstream decodes them ('/', '\\', ';' path
# parameters), controls (NUL included), and '%' itself (double encoding).
_FORBIDDEN_ESCAPES = frozenset([*range(0x00, 0x20), 0x7F, 0x2F, 0x5C, 0x25, 0x3B])


class PathError(ValueError):
    """A path that cannot be normalised safely; `code` is a stable reason code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@functools.lru_cache(maxsize=8192)
def normalize_path(raw: str) -> str:
    """Return the canonical form of a raw `:path`, or raise PathError.

    Steps: drop query and fragment; refuse anything but printable ASCII path characters and `;`
    path parameters (upstreams disagree on them); decode percent-escapes of unreserved characters,
    upper-case the others, refuse escaped slashes, backslashes, controls and '%' (`%2F`, `%5C`,
    `%00`, `%25`), malformed escapes and escapes that are not valid UTF-8; merge
    repeated slashes; resolve `.` and `..` segments, refusing to climb above the root.
    """
    if not raw or len(raw) > MAX_PATH:
        raise PathError("invalid_path", "empty or oversized path")
    if not _RAW_OK.fullmatch(raw):
        raise PathError("invalid_path", "path has characters outside RFC 3986")
    cut = len(raw)
    for sep in ("?", "#"):
        i = raw.find(sep)
        if i != -1 and i < cut:
            cut = i
    path = raw[:cut]
    if ";" in path:
        raise PathError("invalid_path", "path parameters (';') are not accepted")
    if "%" in path:
        path = _decode_unreserved(path)
    segments: list[str] = []
    parts = path.split("/")
    last = len(parts) - 1
    for n, seg in enumerate(parts[1:], start=1):
        if seg == "" and n != last:
            continue  # merged slash
        if seg == ".":
            if n == last:
                segments.append("")
            continue
        if seg == "..":
            if not segments or segments == [""]:
                raise PathError("invalid_path", "dot-segments climb above the root")
            segments.pop()
            if n == last:
                segments.append("")
            continue
        segments.append(seg)
    return "/" + "/".join(segments)


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    raw = bytearray()
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c != "%":
            out.append(c)
            raw.append(ord(c))
            i += 1
            continue
        h = path[i + 1 : i + 3]
        if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
            raise PathError("invalid_path", "malformed percent-escape")
        b = int(h, 16)
        if b in _FORBIDDEN_ESCAPES:
            raise PathError("invalid_path", f"escaped character %{h.upper()} is not accepted")
        ch = chr(b)
        if ch in _UNRESERVED:
            out.append(ch)
        else:
            out.append("%" + h.upper())
        raw.append(b)
        i += 3
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("invalid_path", "percent-escapes do not decode to valid UTF-8") from None
    return "".join(out)
