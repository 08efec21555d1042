"""Clients that put a request on the wire exactly as given, for the path differential test: nothing
parses, normalises or re-encodes the method or the request-target.

- `send_h1`: HTTP/1.1 over a socket; the request line is the caller's bytes.
- `send_h2c`: HTTP/2 with prior knowledge (Envoy's listener speaks both, codec AUTO); `:method`
  and `:path` go out as HPACK literals, so methods HTTP/1.1 parsers refuse (`get`) still reach
  Envoy's HTTP/2 codec.

Each request uses its own connection and reads exactly one response: Envoy keeps a connection it
refused open for its delayed-close timeout, so reading to EOF would wait for that.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_TIMEOUT = 5.0


@dataclass
class Answer:
    status: int | None  # None: the status could not be read (an HTTP/2 stream reset, GOAWAY)
    headers: dict[str, str]
    body: bytes
    note: str = ""


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=_TIMEOUT)


# -- HTTP/1.1 -----------------------------------------------------------------------------------


def send_h1(address: str, method: str, target: str, headers: list[tuple[str, str]]) -> Answer | None:
    """One HTTP/1.1 request (method and target as UTF-8 bytes, verbatim); None when Envoy closed
    without an answer."""
    head_lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers), "connection: close"]
    data = ("\r\n".join(head_lines) + "\r\n\r\n").encode("utf-8")
    buf = b""
    with _connect(address) as s:
        s.sendall(data)

        def more() -> bool:
            nonlocal buf
            try:
                b = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                b = b""
            buf += b
            return bool(b)

        while b"\r\n\r\n" not in buf:
            if not more():
                return None
        head, _, _ = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1."):
            return None
        status = int(lines[0].split(b" ")[1])
        got = {}
        for line in lines[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            got[k.strip().lower()] = v.strip()
        start = len(head) + 4
        if method == "HEAD" or status in (204, 304):
            return Answer(status, got, b"")
        if "content-length" in got:
            while len(buf) - start < int(got["content-length"]) and more():
                pass
        elif got.get("transfer-encoding", "").lower() == "chunked":
            while not buf.endswith(b"0\r\n\r\n") and more():
                pass  # only the end of the body matters here
        else:
            while more():
                pass
        return Answer(status, got, buf[start:])


# -- HTTP/2 (h2c, prior knowledge) --------------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
# RFC 7541 Appendix A: the static table entries for :status.
_STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _huffman_digits(data: bytes) -> str:
    """Decode a Huffman-coded string of decimal digits (a :status value): '0'-'2' have 5-bit
    codes 00000-00010, '3'-'9' 6-bit codes 011001-011111 (RFC 7541 Appendix B)."""
    bits = "".join(f"{b:08b}" for b in data)
    out, i = "", 0
    while i + 5 <= len(bits):
        v = int(bits[i : i + 5], 2)
        if v <= 2:
            out, i = out + str(v), i + 5
            continue
        if i + 6 > len(bits) or not 25 <= int(bits[i : i + 6], 2) <= 31:
            break  # padding (all ones) or not a digit
        out, i = out + str(int(bits[i : i + 6], 2) - 25 + 3), i + 6
    return out


def _status_from_block(block: bytes) -> int | None:
    """:status from the first field of a response header block (a fresh connection: Envoy's
    first representation is static-indexed or a literal naming static entry 8)."""
    if not block:
        return None
    b = block[0]
    if b & 0x80:
        return _STATIC_STATUS.get(b & 0x7F)
    if b & 0xC0 == 0x40:
        index, pos = b & 0x3F, 1
    elif b & 0xE0 == 0x00:
        index, pos = b & 0x0F, 1
    else:
        return None
    if index not in _STATIC_STATUS or pos >= len(block):
        return None
    huffman, length = bool(block[pos] & 0x80), block[pos] & 0x7F
    raw = block[pos + 1 : pos + 1 + length]
    text = _huffman_digits(raw) if huffman else raw.decode("ascii", "replace")
    return int(text) if text.isdigit() else None


def send_h2c(address: str, method: str, target: str, headers: list[tuple[str, str]]) -> Answer | None:
    """One HTTP/2 request on stream 1 of a fresh prior-knowledge connection; `:method` and
    `:path` are the caller's UTF-8 bytes. The body is not collected; the status is read from the
    first header block when it can be."""
    fields = [
        (b":method", method.encode()),
        (b":scheme", b"http"),
        (b":authority", dict(headers).get("host", "localhost").encode()),
        (b":path", target.encode()),
        *((k.encode(), v.encode()) for k, v in headers if k != "host"),
    ]
    block = b"".join(_hpack_literal(k, v) for k, v in fields)
    with _connect(address) as s:
        s.sendall(_PREFACE + _frame(_SETTINGS, 0, 0) + _frame(_HEADERS, _END_STREAM | _END_HEADERS, 1, block))
        buf, status, note = b"", None, ""
        while True:
            while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
                try:
                    chunk = s.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    chunk = b""
                if not chunk:
                    return Answer(status, {}, b"", note or "connection closed") if status or note else None
                buf += chunk
            length = int.from_bytes(buf[:3], "big")
            kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload, buf = buf[9 : 9 + length], buf[9 + length :]
            if kind == _SETTINGS and not flags & _ACK:
                s.sendall(_frame(_SETTINGS, _ACK, 0))
            elif kind == _GOAWAY:
                return Answer(status, {}, b"", "GOAWAY")
            elif stream == 1 and kind == _RST_STREAM:
                return Answer(status, {}, b"", f"RST_STREAM {int.from_bytes(payload[:4], 'big')}")
            elif stream == 1 and kind == _HEADERS:
                if status is None:
                    status = _status_from_block(_strip_padding(payload, flags))
                if flags & _END_STREAM:
                    return Answer(status, {}, b"")
            elif stream == 1 and kind == _DATA and flags & _END_STREAM:
                return Answer(status, {}, b"")


def _strip_padding(payload: bytes, flags: int) -> bytes:
    """The header block fragment of a HEADERS frame (PADDED 0x8 and PRIORITY 0x20 flags)."""
    pad = 0
    if flags & 0x8:
        pad, payload = payload[0], payload[1:]
    if flags & 0x20:
        payload = payload[5:]
    return payload[: len(payload) - pad] if pad else payload
