"""Reading a CheckRequest: every RequestAttributes field comes from its own place in the request
(the attributes are built positionally, for speed: a swapped field must fail here)."""

from __future__ import annotations

from dataclasses import fields

from hypothesis import given, settings
from hypothesis import strategies as st

import sidecar.attributes as A
from sidecar.attributes import JWT_AUTHN_NAMESPACE, RequestAttributes, from_check_request
from tests.helpers import check_request


def test_each_field_is_read_from_its_own_place() -> None:
    req = check_request(
        "/shop/%49tems?q=1",
        method="PATCH",
        token="abc.def.ghi",
        headers={"x-http-method-override": "DELETE", "x-device-id": "dev-7"},
        source="10.1.2.3",
        principal="spiffe://cluster.local/ns/shop/sa/web",
        jwt_payload={"sub": "alice"},
        context_extensions={"sensitivity": "high"},
        host="Shop.Example.TEST",
    )
    a = from_check_request(req)
    assert a.method == "PATCH"
    assert a.raw_path == "/shop/%49tems?q=1"
    assert a.path == "/shop/Items" and a.path_error == ""
    assert a.host == "shop.example.test"
    assert a.headers["x-device-id"] == "dev-7" and a.headers["authorization"] == "Bearer abc.def.ghi"
    assert a.is_grpc is True
    assert a.principal == "spiffe://cluster.local/ns/shop/sa/web"
    assert a.source_ip == "10.1.2.3"
    assert a.jwt_authn == {"jwt_payload": {"sub": "alice"}}
    assert a.context_extensions == {"sensitivity": "high"}
    assert a.bearer == "abc.def.ghi" and a.auth_problem == ""
    assert a.header_problem == ""
    assert a.method_override is True
    st = req.attributes.metadata_context.filter_metadata[JWT_AUTHN_NAMESPACE]
    assert a.jwt_authn_bytes == st.ByteSize() > 0
    # Every field was looked at above (a new field must be added to this test too).
    assert [f.name for f in fields(RequestAttributes)] == [
        "method", "raw_path", "path", "path_error", "host", "headers", "is_grpc", "principal", "source_ip",
        "jwt_authn", "context_extensions", "bearer", "auth_problem", "header_problem", "method_override",
        "jwt_authn_bytes",
    ]  # fmt: skip


def test_the_problems_are_read_into_their_own_fields() -> None:
    a = from_check_request(
        check_request("/a/%2e%2e/b", grpc=False, headers={"authorization": "Bearer a, Bearer b", "x-bad": "a\x01b"})
    )
    assert a.path == "" and a.path_error != ""
    assert a.bearer == "" and a.auth_problem == "ambiguous_credentials"
    assert a.header_problem == "header 'x-bad' has control characters"
    assert a.is_grpc is False and a.method_override is False and a.jwt_authn_bytes == 0


# --- the Authorization value memo (`_CREDENTIALS`): the same attributes as a first reading --------

_CHARS = st.sampled_from(["a", "Z", "0", ".", "-", "_", "~", "+", "/", "=", " ", ",", "\t", "\x01", "\x7f", "é", "\n"])
_VALUES = st.one_of(
    st.text(_CHARS, max_size=24).map(lambda t: "Bearer " + t),
    st.text(_CHARS, max_size=24),
    st.just("Bearer " + "a" * (A.MAX_HEADER_VALUE + 1)),  # too large: never left out of the scan
    st.just("Bearer " + "a" * (A._CREDENTIAL_CHARS + 1)),  # too long to be remembered
)


def _form(auth: list[str], other: dict[str, str], form: str) -> object:
    if form == "map":
        pairs = [("authorization", v.encode()) for v in auth] + [(k, v.encode()) for k, v in other.items()]
        return check_request(header_map=pairs)
    if form == "mixed-case":
        headers = {("Authorization" if i == 0 else "AUTHORIZATION"): v for i, v in enumerate(auth[:2])}
        return check_request(headers={**headers, **other})
    return check_request(headers={**({"authorization": auth[0]} if auth else {}), **other})


@settings(max_examples=400, deadline=None)
@given(
    auth=st.lists(_VALUES, max_size=2),
    other=st.dictionaries(st.sampled_from(["x-a", "x-b", "x bad", "x-device-id"]), st.text(_CHARS, max_size=8), max_size=3),
    form=st.sampled_from(["plain", "map", "mixed-case"]),
)
def test_a_remembered_credential_reads_as_a_first_reading(auth: list[str], other: dict[str, str], form: str) -> None:
    req = _form(auth, other, form)
    A._CREDENTIALS.clear()
    plain = from_check_request(req)  # a first reading (the memo empty; it fills it)
    again = from_check_request(req)  # read from the memo
    for i in range(8):  # (other values remembered meanwhile)
        from_check_request(check_request(token=f"other{i}"))
    first = from_check_request(req)
    A._CREDENTIALS.clear()
    assert first == plain and again == plain


def test_a_credential_with_control_characters_is_reported_when_remembered() -> None:
    A._CREDENTIALS.clear()
    req = check_request(headers={"authorization": "Bearer abc\x01def"})
    for _ in range(2):
        a = from_check_request(req)
        assert a.header_problem == "header 'authorization' has control characters"
        assert a.bearer == "" and a.auth_problem == "malformed_token"
    # too large: reported whether or not it is remembered
    req = check_request(headers={"authorization": "Bearer " + "a" * A.MAX_HEADER_VALUE})
    for _ in range(2):
        assert from_check_request(req).header_problem == "header 'authorization' is too large"
    # and a clean one beside a dirty other header: the other is still found
    req = check_request(headers={"authorization": "Bearer abc.def", "x-bad": "a\x00"})
    for _ in range(2):
        a = from_check_request(req)
        assert a.header_problem == "header 'x-bad' has control characters" and a.bearer == "abc.def"


def test_the_credential_memo_is_bounded() -> None:
    A._CREDENTIALS.clear()
    for i in range(A._CREDENTIALS_MAX * 2 + 7):
        from_check_request(check_request(token=f"tok{i}"))
        assert len(A._CREDENTIALS) <= A._CREDENTIALS_MAX
    long = "a" * A._CREDENTIAL_CHARS
    from_check_request(check_request(token=long))
    assert "Bearer " + long not in A._CREDENTIALS  # longer than _CREDENTIAL_CHARS: not kept
    wide = "Bearer " + "\U0001f600" * 100  # (4 bytes a character: a memo of those would be 4x the size)
    a = from_check_request(check_request(headers={"authorization": wide}))
    assert wide not in A._CREDENTIALS and a.auth_problem == "malformed_token"  # only ASCII values are kept
    A._CREDENTIALS.clear()
