"""Reading a CheckRequest: every RequestAttributes field comes from its own place in the request
(the attributes are built positionally, for speed: a swapped field must fail here)."""

from __future__ import annotations

from dataclasses import fields

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
