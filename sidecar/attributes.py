"""The only code that reads `CheckRequest` fields: protobuf in, a RequestAttributes out (read-only
by convention: nothing writes to one after it is made)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sidecar.paths import PathError, normalize_path

JWT_AUTHN_NAMESPACE = "envoy.filters.http.jwt_authn"
_TOKEN68_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
_BAD_HEADER_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])
_NAME_FORBIDDEN = bytes([*range(0x00, 0x21), 0x7F])
_BAD_NAME_CHARS = re.compile(r"[\x00-\x20\x7f]")
MAX_HEADER_VALUE = 16 * 1024
# raw path -> (canonical path, problem): normalize_path is a pure function, and most calls repeat
# a path (gRPC methods, REST routes). Bounded (at most ~2 MB, whoever sends the paths); emptied
# when full.
_PATHS: dict[str, tuple[str, str]] = {}
_PATHS_MAX = 4096
_PATH_CHARS = 256
# a lone Authorization value -> _credential(value): a pure function, and a client sends the same
# token on every call until it expires. Bounded (ASCII values only, a byte a character: at most
# ~5 MB with the token kept beside, whoever sends the values); emptied when full.
_CREDENTIALS: dict[str, tuple[str, str, bool]] = {}
_CREDENTIALS_MAX = 512
_CREDENTIAL_CHARS = 4096
_NO_METADATA: dict[str, Any] = {}


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 1.5 us more per Check
class RequestAttributes:
    method: str
    raw_path: str
    path: str  # canonical; "" when path_error is set
    path_error: str
    host: str
    headers: dict[str, str]
    is_grpc: bool
    principal: str
    source_ip: str
    jwt_authn: dict[str, Any]
    context_extensions: dict[str, str]
    # Authorization: "" none, else the token; `auth_problem` is "ambiguous_credentials" (repeated or
    # comma-joined credentials) or "malformed_token".
    bearer: str = ""
    auth_problem: str = ""
    header_problem: str = ""
    method_override: bool = False  # X-HTTP-Method-Override (and kin) or a `_method` query parameter
    jwt_authn_bytes: int = 0  # the jwt_authn metadata's wire size (a cheap bound on its size)


def from_check_request(req: Any) -> RequestAttributes:
    """Read a `envoy.service.auth.v3.CheckRequest`. Never raises for hostile content."""
    attrs = req.attributes
    http = attrs.request.http
    header_problem = ""
    auth_values: list[str] = []
    headers: dict[str, str]
    keys = ""  # the header names joined, when read from Envoy's map already lower-case
    if http.HasField("header_map") and len(http.header_map.headers):  # (HasField makes no wrapper)
        # Repeated keys are collected, then joined once (as Envoy joins them): linear in the
        # number of values, however many times one key repeats.
        multi: dict[str, list[str]] = {}
        for hv in http.header_map.headers:
            key = hv.key.lower()
            raw = hv.raw_value
            try:
                value = raw.decode("utf-8") if raw else hv.value
            except UnicodeDecodeError:
                header_problem = f"header {key[:64]!r} is not valid UTF-8"
                continue
            if key == "authorization":
                auth_values.append(value)
            values = multi.get(key)
            if values is None:
                multi[key] = [value]
            else:
                values.append(value)
        headers = {k: v[0] if len(v) == 1 else ",".join(v) for k, v in multi.items()}
    else:
        hm = http.headers
        headers = {k: hm[k] for k in hm}  # Envoy lower-cases these keys (2x faster than dict(hm))
        keys = "".join(headers)
        if keys != keys.lower():
            keys = ""  # (the folded names, below)
            # Not from Envoy: fold case, joining repeats as Envoy would, keeping every credential.
            folded: dict[str, list[str]] = {}
            for k, v in headers.items():
                key = k.lower()
                if key == "authorization":
                    auth_values.append(v)
                folded.setdefault(key, []).append(v)
            headers = {k: ",".join(v) for k, v in folded.items()}
        elif "authorization" in headers:
            auth_values.append(headers["authorization"])
    cred: tuple[str, str, bool] | None = None
    if len(auth_values) == 1:  # (then it is headers["authorization"] itself)
        value = auth_values[0]
        cred = _CREDENTIALS.get(value)
        if cred is None:
            cred = _credential(value)
            if len(value) <= _CREDENTIAL_CHARS and value.isascii():  # (isascii: a flag, O(1))
                _keep(_CREDENTIALS, _CREDENTIALS_MAX, value, cred)
    if cred is not None and cred[2]:
        # The credential is scanned once, when first seen (the longest value by far, and the
        # same on every call of a client): the other values here.
        rest = "".join([v for k, v in headers.items() if k != "authorization"])
        joined = rest.encode("utf-8", "surrogatepass")
    else:
        joined = "".join(headers.values()).encode("utf-8", "surrogatepass")
    names = (keys or "".join(headers)).encode("utf-8", "surrogatepass")
    # bytes.translate is a C loop: the common (clean) case costs well under a microsecond.
    if not _values_clean(joined) or len(names.translate(None, _NAME_FORBIDDEN)) != len(names):
        # Rare path: find which header is oversized or carries control characters (tab is fine
        # in a value; a name has neither controls nor whitespace).
        for key, value in headers.items():
            if len(value) > MAX_HEADER_VALUE:
                header_problem = f"header {key[:64]!r} is too large"
            elif _BAD_HEADER_CHARS.search(value):
                header_problem = f"header {key[:64]!r} has control characters"
            elif _BAD_NAME_CHARS.search(key):
                header_problem = "a header name has control characters or whitespace"

    bearer, auth_problem = (cred[0], cred[1]) if cred is not None else _bearer(auth_values)

    # One source of truth: Envoy always fills `method` and `path`; pseudo-headers are ignored.
    raw_path = http.path
    known = _PATHS.get(raw_path)
    if known is None:
        try:
            known = normalize_path(raw_path), ""
        except PathError as e:
            known = "", str(e)
        if len(raw_path) <= _PATH_CHARS:
            _keep(_PATHS, _PATHS_MAX, raw_path, known)
    path, path_error = known

    jwt_authn: dict[str, Any] = {}
    jwt_authn_bytes = 0
    md = attrs.metadata_context.filter_metadata if attrs.HasField("metadata_context") else _NO_METADATA
    if JWT_AUTHN_NAMESPACE in md:
        st = md[JWT_AUTHN_NAMESPACE]
        jwt_authn, jwt_authn_bytes = _struct(st), st.ByteSize()

    q = raw_path.find("?")
    method_override = (
        "x-http-method-override" in headers
        or "x-http-method" in headers
        or "x-method-override" in headers
        or (q != -1 and "_method=" in raw_path[q:])
    )
    source = attrs.source
    ext = attrs.context_extensions
    # Positional, in the field order above (keywords cost half a microsecond more per Check).
    return RequestAttributes(
        http.method,  # method: case-sensitive (RFC 9110 §9.1)
        raw_path,
        path,
        path_error,
        (http.host or headers.get(":authority", "")).lower(),  # host
        headers,
        headers.get("content-type", "").startswith("application/grpc"),  # is_grpc
        source.principal,
        source.address.socket_address.address,  # source_ip
        jwt_authn,
        {k: ext[k] for k in ext} if len(ext) else {},  # context_extensions
        bearer,
        auth_problem,
        header_problem,
        method_override,
        jwt_authn_bytes,
    )


def _keep(memo: dict[str, Any], limit: int, key: str, value: Any) -> None:
    """Remember `value` under `key` in one of the bounded memos: emptied when full."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value


def _values_clean(raw: bytes) -> bool:
    """Header values (UTF-8, joined) within MAX_HEADER_VALUE and free of control characters (tab
    is fine in a value)."""
    return len(raw) <= MAX_HEADER_VALUE and len(raw.translate(None, _CONTROL_BYTES)) == len(raw)


def _credential(value: str) -> tuple[str, str, bool]:
    """(token, problem, clean) of a lone Authorization value: `_bearer([value])`, and whether the
    value passes the header checks on its own (`_values_clean`)."""
    token, problem = _bearer([value])
    return token, problem, _values_clean(value.encode("utf-8", "surrogatepass"))


def _bearer(values: list[str]) -> tuple[str, str]:
    """-> (token, problem). Another scheme (Basic...) is no bearer credential; repeated or
    comma-joined credentials are ambiguous."""
    if not values:
        return "", ""
    if len(values) > 1:
        return "", "ambiguous_credentials"
    value = values[0].strip()
    if "," in value:
        return "", "ambiguous_credentials"
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "bearer":
        return "", ""
    token = rest.strip()
    if not token:
        return "", "malformed_token"
    if not _is_token68(token):
        return "", "malformed_token"
    return token, ""


def _is_token68(token: str) -> bool:
    """RFC 6750 b64token: [A-Za-z0-9-._~+/]+ followed by '=' padding only."""
    if not token.isascii():
        return False
    raw = token.encode("ascii")
    body = raw.rstrip(b"=")
    return bool(body) and not body.translate(None, _TOKEN68_CHARS)


def _struct(st: Any) -> dict[str, Any]:
    """A google.protobuf.Struct as plain data. Unlike json_format.MessageToDict (which raises on
    NaN and Infinity, and costs ~10 µs), numbers stay floats, whatever they hold: the claim checks
    refuse the ones that are no time."""
    return {k: _value(v) for k, v in st.fields.items()}


def _value(v: Any) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        return v.number_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return _struct(v.struct_value)
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    return None
