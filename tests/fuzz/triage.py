"""Replay what the fuzzer saved, group it by kind of violation, and shrink one input per kind.

    .venv/bin/python -m tests.fuzz.triage [--minimize OUT_DIR] [PATH...]   (default .fuzz/crashers)

PATH: files of raw input bytes (the fuzzer's `violation-*` and `crash-*` files) or regression
files (*.json). Each input is replayed through `harness.Target`; inputs are grouped by the
violation's signature. With --minimize, the smallest input of each group is shrunk field by field
(whole fields cleared, headers and metadata entries dropped, path characters removed, token
claims removed and the token signed again with the development key when it was signed with it)
for as long as the same violation remains, and written to OUT_DIR as a regression file in the
format of tests/data/fuzz_regressions/ (readable JSON when it survives a JSON round trip).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from google.protobuf import json_format  # noqa: E402

from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from tests.fuzz import generate as g  # noqa: E402
from tests.fuzz.harness import Target, Violation, load_regression, parse_request  # noqa: E402


def signature_of(target: Target, data: bytes) -> str | None:
    try:
        target.check(data)
    except Violation as v:
        return v.signature
    return None


def _inputs(paths: list[Path]) -> Iterator[tuple[Path, bytes]]:
    for p in paths:
        files = sorted(p.iterdir()) if p.is_dir() else [p]
        for f in files:
            if f.suffix == ".txt" or not f.is_file():
                continue
            yield f, load_regression(f) if f.suffix == ".json" else f.read_bytes()


# ------------------------------------------------------------------------------------------------
# Structural shrinking
# ------------------------------------------------------------------------------------------------


def _copy(req: Any) -> Any:
    out = external_auth_pb2.CheckRequest()
    out.CopyFrom(req)
    return out


def _candidates(req: Any) -> Iterator[Any]:
    """Smaller variants of `req`, one change each."""
    attrs = req.attributes
    for name in ("source", "destination", "metadata_context", "tls_session", "request"):
        if attrs.HasField(name):
            c = _copy(req)
            c.attributes.ClearField(name)
            yield c
    if len(attrs.context_extensions):
        c = _copy(req)
        c.attributes.ClearField("context_extensions")
        yield c
    http = attrs.request.http
    for name in ("id", "host", "scheme", "query", "fragment", "body", "raw_body", "protocol", "size", "method", "path"):
        if getattr(http, name):
            c = _copy(req)
            c.attributes.request.http.ClearField(name)
            yield c
    for name in ("address", "principal", "service", "labels", "certificate"):
        try:
            present = attrs.source.HasField(name)
        except ValueError:
            present = bool(getattr(attrs.source, name))
        if present:
            c = _copy(req)
            c.attributes.source.ClearField(name)
            yield c
    for key in list(attrs.context_extensions):
        c = _copy(req)
        del c.attributes.context_extensions[key]
        yield c
    for ns in list(attrs.metadata_context.filter_metadata):
        c = _copy(req)
        del c.attributes.metadata_context.filter_metadata[ns]
        yield c
        for field in list(attrs.metadata_context.filter_metadata[ns].fields):
            c = _copy(req)
            del c.attributes.metadata_context.filter_metadata[ns].fields[field]
            yield c
            inner = attrs.metadata_context.filter_metadata[ns].fields[field]
            if inner.HasField("struct_value"):
                for sub in list(inner.struct_value.fields):
                    c = _copy(req)
                    del c.attributes.metadata_context.filter_metadata[ns].fields[field].struct_value.fields[sub]
                    yield c
    for key in list(http.headers):
        c = _copy(req)
        del c.attributes.request.http.headers[key]
        yield c
        value = http.headers[key]
        if key.lower() != "authorization" and len(value) > 8:
            c = _copy(req)
            c.attributes.request.http.headers[key] = value[: len(value) // 2]
            yield c
    for i in range(len(http.header_map.headers)):
        c = _copy(req)
        del c.attributes.request.http.header_map.headers[i]
        yield c
        h = http.header_map.headers[i]
        if h.key.lower() != "authorization" and len(h.raw_value) > 8:
            c = _copy(req)
            c.attributes.request.http.header_map.headers[i].raw_value = h.raw_value[: len(h.raw_value) // 2]
            yield c
    if 1 < len(http.path) <= 400:
        for i in range(len(http.path)):
            c = _copy(req)
            c.attributes.request.http.path = http.path[:i] + http.path[i + 1 :]
            yield c
    yield from _token_candidates(req)


def _dev_signed(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and g.signature(parts[0] + "." + parts[1], "dev") == parts[2]


def _token_candidates(req: Any) -> Iterator[Any]:
    """Remove one claim or one JOSE header member of a bearer token, keeping its signature valid."""
    http = req.attributes.request.http
    spots: list[tuple[str, Any, str]] = []
    for k in http.headers:
        if k.lower() == "authorization":
            spots.append(("headers", k, http.headers[k]))
    for i, h in enumerate(http.header_map.headers):
        if h.key.lower() == "authorization":
            spots.append(("header_map", i, (h.raw_value or h.value.encode()).decode("utf-8", "replace")))
    for form, where, value in spots:
        m = re.fullmatch(r"(\s*\S+\s+)(\S+)(\s*)", value)
        if not m or not _dev_signed(m[2]):
            continue
        head, body = (g.b64u_decode(p) for p in m[2].split(".")[:2])
        for which, raw in (("payload", body), ("header", head)):
            try:
                obj = json.loads(raw or b"")
            except (ValueError, RecursionError):
                continue
            if not isinstance(obj, dict):
                continue
            for name in list(obj):
                smaller = {k: v for k, v in obj.items() if k != name}
                text = json.dumps(smaller, separators=(",", ":")).encode()
                h2, p2 = (text, body) if which == "header" else (head, text)
                assert h2 is not None and p2 is not None
                signing_input = g.b64u(h2) + "." + g.b64u(p2)
                token = signing_input + "." + g.signature(signing_input, "dev")
                new_value = m[1] + token + m[3]
                c = _copy(req)
                if form == "headers":
                    c.attributes.request.http.headers[where] = new_value
                else:
                    c.attributes.request.http.header_map.headers[where].raw_value = new_value.encode()
                yield c


def minimize(data: bytes, still: Callable[[bytes], bool]) -> bytes:
    req = parse_request(data)
    if req is None:
        return data
    best = req
    changed = True
    while changed:
        changed = False
        for c in _candidates(best):
            out = c.SerializeToString()
            if len(out) < len(best.SerializeToString()) and still(out):
                best, changed = c, True
                break
    result: bytes = best.SerializeToString()
    return result


def regression_doc(data: bytes, why: str) -> dict[str, Any]:
    req = parse_request(data)
    if req is not None:
        try:
            doc = json_format.MessageToDict(req)
            if json_format.ParseDict(doc, external_auth_pb2.CheckRequest()) == req:  # maps may reorder
                return {"why": why, "request": doc}
        except Exception:
            pass
    return {"why": why, "base64": base64.b64encode(data).decode()}


def _slug(text: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]
    return f"{words}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, default=[ROOT / ".fuzz" / "crashers"])
    ap.add_argument("--minimize", type=Path, metavar="OUT_DIR")
    args = ap.parse_args()
    target = Target(quiet=True)
    groups: dict[str, list[tuple[Path, bytes]]] = {}
    passing = 0
    for path, data in _inputs(args.paths):
        sig = signature_of(target, data)
        if sig is None:
            passing += 1
        else:
            groups.setdefault(sig, []).append((path, data))
    print(f"{sum(map(len, groups.values()))} failing inputs in {len(groups)} kinds; {passing} pass now")
    for sig, items in sorted(groups.items()):
        items.sort(key=lambda x: len(x[1]))
        print(f"\n[{len(items)}] {sig}\n    smallest: {items[0][0]} ({len(items[0][1])} bytes)")
        if args.minimize:
            small = minimize(items[0][1], lambda d, sig=sig: signature_of(target, d) == sig)
            args.minimize.mkdir(parents=True, exist_ok=True)
            out = args.minimize / f"{_slug(sig)}.json"
            out.write_text(json.dumps(regression_doc(small, sig), indent=2, ensure_ascii=True) + "\n")
            print(f"    minimized to {len(small)} bytes: {out}")
    target.close()


if __name__ == "__main__":
    main()
