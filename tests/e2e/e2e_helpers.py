"""Small client-side helpers shared by the e2e tests (no fixtures here)."""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass
from typing import Any

_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="bank", error="x", max_age=60` -> ("Bearer", {"realm": "bank", ...}).

    Strict: the whole value must be one scheme and well-formed auth-params (RFC 9110 §11.2)."""
    scheme, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        assert m is not None and m.end() > pos, f"malformed challenge at {rest[pos:]!r} in {value!r}"
        name = m.group(1)
        assert name not in params, f"repeated parameter {name!r} in {value!r}"
        quoted = m.group(2)
        params[name] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else m.group(3)
        pos = m.end()
    return scheme, params


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        assert values is None or len(values) == 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    address: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> HttpAnswer:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        got: dict[str, list[str]] = {}
        for k, v in r.getheaders():
            got.setdefault(k.lower(), []).append(v)
        return HttpAnswer(r.status, got, r.read())
    finally:
        conn.close()


def metadata_values(md: Any, name: str) -> list[str]:
    """All values of `name` in gRPC metadata (a sequence of (key, value) pairs)."""
    return [v for k, v in (md or ()) if k == name]
