"""No request content can crash a Check (hardening issue, class 2), and claims mean what the IdP
meant (class 3).

Every case goes through the real servicer (`AuthorizationServicer.Check`) so that an exception
anywhere (attributes, identity, engine, response, telemetry) would show as `internal_error` and
in the internal-error counter, which must stay at zero.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2
from sidecar.compiler import load_policy_text
from sidecar.runtime import Runtime
from sidecar.server import AuthorizationServicer
from sidecar.telemetry import Metrics, Telemetry
from tests.helpers import ACR_PHRH, EXAMPLE_POLICY, ISSUER, NOW, FixedClock, check_request, make_token
from tests.test_jwt_attacks import DEV_HEADER, claims, sign

BALANCE = "/bank.v1.Accounts/GetBalance"
TRANSFER = "/bank.v1.Payments/Transfer"
LEDGER = "spiffe://cluster.local/ns/bank/sa/ledger"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: Any, payload: Any) -> str:
    """header.payload.signature with arbitrary JSON text (or values) and a junk signature."""
    h = header if isinstance(header, str) else json.dumps(header)
    p = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{_b64(h.encode())}.{_b64(p.encode())}.{_b64(b'sig')}"


# Deeper than json's recursion limit (1000), yet small enough for the 8 KiB token limit.
DEEP = "[" * 2_500 + "]" * 2_500
DEEP_OBJECT = '{"a":' * 1_000 + "1" + "}" * 1_000


class Handler:
    def __init__(self, policy_text: str | None = None) -> None:
        self.metrics = Metrics()
        policy = load_policy_text(
            policy_text or EXAMPLE_POLICY.read_text(), file="<policy>", base_dir=EXAMPLE_POLICY.parent
        )
        telemetry = Telemetry(None, decision_log=None, metrics=self.metrics)
        self.servicer = AuthorizationServicer(Runtime(policy, telemetry, FixedClock(NOW)))
        self.loop = asyncio.new_event_loop()

    def check(self, req: Any) -> Any:
        wire = req.SerializeToString()  # what arrives from Envoy
        resp = self.loop.run_until_complete(
            self.servicer.Check(external_auth_pb2.CheckRequest.FromString(wire), None)
        )
        assert self.metrics.registry.get_sample_value("stepup_internal_errors_total") == 0
        return resp


@pytest.fixture(scope="module")
def handler() -> Iterator[Handler]:
    h = Handler()
    yield h
    h.loop.close()


def answer(resp: Any) -> tuple[int, str]:
    return (resp.denied_response.status.code or 200, resp.status.message)


UNSIGNED = [
    ("iss is a list", unsigned(DEV_HEADER, claims(iss=[ISSUER])), "malformed_token"),
    ("iss is an object", unsigned(DEV_HEADER, claims(iss={"x": 1})), "malformed_token"),
    ("iss is a number", unsigned(DEV_HEADER, claims(iss=7)), "malformed_token"),
    ("iss is null", unsigned(DEV_HEADER, claims(iss=None)), "malformed_token"),
    ("alg is a list", unsigned({**DEV_HEADER, "alg": ["RS256"]}, claims()), "malformed_token"),
    ("alg is an object", unsigned({**DEV_HEADER, "alg": {"a": 1}}, claims()), "malformed_token"),
    ("kid is an object", unsigned({**DEV_HEADER, "kid": {"a": 1}}, claims()), None),
    ("kid is a list", unsigned({**DEV_HEADER, "kid": ["x"]}, claims()), None),
    ("header is a list", unsigned([1, 2], claims()), "malformed_token"),
    ("payload is a string", unsigned(DEV_HEADER, '"x"'), "malformed_token"),
    ("header nested deeper than the parser allows", unsigned(DEEP, claims()), "malformed_token"),
    ("payload nested deeper than the parser allows", unsigned(DEV_HEADER, DEEP), "malformed_token"),
    ("deep object in the payload", unsigned(DEV_HEADER, DEEP_OBJECT), "malformed_token"),
    ("header is not UTF-8", _b64(b'{"alg":"\xff"}') + "." + _b64(b"{}") + ".c2ln", "malformed_token"),
    ("payload is NaN", unsigned(DEV_HEADER, "NaN"), "malformed_token"),
    ("crit is an object", unsigned({**DEV_HEADER, "crit": {"a": 1}}, claims()), None),
]


@pytest.mark.parametrize(("name", "token", "reason"), UNSIGNED, ids=[c[0] for c in UNSIGNED])
def test_unsigned_tokens_with_wrong_json_types_are_401_with_a_specific_reason(
    handler: Handler, name: str, token: str, reason: str | None
) -> None:
    status, got = answer(handler.check(check_request(BALANCE, token=token)))
    assert status == 401
    if reason is not None:
        assert got == reason
    else:
        assert got in ("malformed_token", "bad_signature", "unknown_key", "invalid_token")


SIGNED = [
    ("exp beyond float range", {"exp": 10**400}, "invalid_claim"),
    ("exp a huge negative integer", {"exp": -(10**400)}, "invalid_claim"),
    ("nbf beyond float range", {"nbf": 10**400}, "invalid_claim"),
    ("iat beyond float range", {"iat": 10**400}, "invalid_claim"),
    ("auth_time beyond float range", {"auth_time": 10**400}, "invalid_claim"),
    ("auth_time a huge negative integer", {"auth_time": -(10**400)}, "invalid_claim"),
    ("exp just past 2^53", {"exp": 2**53}, "invalid_claim"),
    ("exp a boolean", {"exp": True}, "invalid_claim"),
    ("sub an object", {"sub": {"id": 1}}, "invalid_claim"),
    ("sub a list", {"sub": ["alice"]}, "invalid_claim"),
    ("sub empty", {"sub": ""}, "invalid_claim"),
    ("sub with CR LF (it goes to a header)", {"sub": "alice\r\nx-auth-assurance: aal3"}, "invalid_claim"),
    ("sub with NUL", {"sub": "alice\u0000"}, "invalid_claim"),
    ("sub a lone surrogate (no text: the whole token is malformed)", {"sub": "\ud800"}, "malformed_token"),
    ("roles an object", {"roles": {"teller": True}}, "invalid_claim"),
    ("roles a list of numbers", {"roles": [1, 2]}, "invalid_claim"),
    ("roles a list holding a list", {"roles": [["teller"]]}, "invalid_claim"),
    ("groups a number", {"groups": 3}, "invalid_claim"),
    ("scope a number", {"scope": 3}, "invalid_claim"),
    ("scope a list holding an object", {"scope": [{"a": 1}]}, "invalid_claim"),
    ("acr a number", {"acr": 2}, "invalid_claim"),
    ("acr a list of objects", {"acr": [{"v": "phrh"}]}, "invalid_claim"),
    ("amr an object", {"amr": {"pwd": 1}}, "invalid_claim"),
    ("aud an object", {"aud": {"bank-api": True}}, "invalid_claim"),
    ("aud a number", {"aud": 1}, "invalid_claim"),
]


@pytest.mark.parametrize(("name", "override", "reason"), SIGNED, ids=[c[0] for c in SIGNED])
def test_signed_tokens_with_wrong_claim_types_are_401_with_a_specific_reason(
    handler: Handler, name: str, override: dict[str, Any], reason: str
) -> None:
    token = sign(DEV_HEADER, json.dumps(claims(**override)))
    assert answer(handler.check(check_request(BALANCE, token=token))) == (401, reason)


def test_a_single_string_role_is_one_value_not_split(handler: Handler) -> None:
    """`roles: "auditor teller"` is one role named "auditor teller" (only `scope` is
    space-separated): it does not grant what the role `teller` may do."""
    as_string = make_token(roles="auditor teller")
    assert answer(handler.check(check_request(BALANCE, token=as_string))) == (403, "permission_denied")
    as_list = make_token(roles=["auditor", "teller"])
    assert answer(handler.check(check_request(BALANCE, token=as_list))) == (200, "")


def test_a_single_string_group_is_one_value(tmp_path: Any) -> None:
    doc = yaml.safe_load(EXAMPLE_POLICY.read_text())
    for perm in doc["permissions"]:
        if perm["id"] == "tellers-read":
            perm["allow"] = {"groups": ["tellers"]}
    h = Handler(yaml.safe_dump(doc))
    try:
        split = make_token(groups="ops tellers")
        assert answer(h.check(check_request(BALANCE, token=split))) == (403, "permission_denied")
        one = make_token(groups="tellers")
        assert answer(h.check(check_request(BALANCE, token=one))) == (200, "")
    finally:
        h.loop.close()


def test_scope_is_space_separated(handler: Handler) -> None:
    strong = make_token(acr="phr", scope="read payments")
    assert answer(handler.check(check_request(TRANSFER, token=strong))) == (200, "")
    run_together = make_token(acr="phr", scope="readpayments")
    assert answer(handler.check(check_request(TRANSFER, token=run_together))) == (403, "insufficient_scope")


def test_a_single_string_amr_is_one_method(handler: Handler) -> None:
    """`amr: "pwd"` is the method pwd (derives the first level), not an invalid claim."""
    token = make_token(drop=("acr",), amr="pwd")
    assert answer(handler.check(check_request(BALANCE, token=token))) == (200, "")


def test_workload_granted_by_anyone_on_a_non_public_level_needs_a_user_token() -> None:
    """An `anyone` grant on a level that needs assurance, called by an mTLS workload with no token:
    401 missing_credential (what is missing is a user token), not an internal error."""
    doc = yaml.safe_load(EXAMPLE_POLICY.read_text())
    doc["permissions"].append({"id": "anyone-transfers", "match": [TRANSFER], "allow": {"anyone": True}})
    h = Handler(yaml.safe_dump(doc))
    try:
        resp = h.check(check_request(TRANSFER, principal=LEDGER))
        assert answer(resp) == (401, "missing_credential")
        www = {x.header.key: x.header.value for x in resp.denied_response.headers}["www-authenticate"]
        assert www == 'Bearer realm="bank"'
        # and with a user token, the user's assurance decides
        strong = make_token(acr=ACR_PHRH, roles=["nobody"], scope="")
        assert answer(h.check(check_request(TRANSFER, token=strong, principal=LEDGER))) == (200, "")
    finally:
        h.loop.close()


def test_many_repeats_of_one_header_are_joined_in_linear_time(handler: Handler) -> None:
    """8,000 repeats of one key in header_map (16 KB joined): joined once (Envoy's comma-join), answered."""
    pairs = [("x-note", b"a")] * 8_000
    resp = handler.check(check_request("/healthz", method="GET", grpc=False, header_map=pairs))
    assert answer(resp) == (200, "")


@pytest.mark.parametrize("principal", ["x" * 100_000, "\x00", "spiffe://\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")])
def test_odd_principals_are_just_principals(handler: Handler, principal: str) -> None:
    assert answer(handler.check(check_request(BALANCE, principal=principal))) == (401, "missing_credential")


@pytest.mark.parametrize("source", ["x" * 100_000, "::ffff:999.1.1.1", "", "1.2.3.4%eth0"])
def test_odd_source_addresses_count_as_untrusted(handler: Handler, source: str) -> None:
    teller = make_token()
    assert answer(handler.check(check_request(BALANCE, token=teller, source=source))) == (401, "acr_too_low")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e300])
def test_jwt_authn_metadata_with_non_finite_numbers_is_an_invalid_claim(handler: Handler, value: float) -> None:
    """A google.protobuf.Struct can hold NaN and Infinity (json_format refuses to convert them)."""
    meta = {"iss": ISSUER, "aud": "bank-api", "sub": "carol", "exp": value, "roles": ["teller"]}
    assert answer(handler.check(check_request(BALANCE, jwt_payload=meta))) == (401, "invalid_claim")
    meta = {"iss": ISSUER, "aud": "bank-api", "sub": "carol", "exp": NOW + 60, "auth_time": value}
    assert answer(handler.check(check_request(BALANCE, jwt_payload=meta))) == (401, "invalid_claim")


def test_decision_ids_tell_nothing_about_each_other() -> None:
    """An id shown to a caller (in a 403 body, say) must not name the next ones or count the
    traffic between two of theirs (red-team F8: a per-process prefix and a counter did)."""
    import os as _os

    from sidecar.server import new_decision_id

    ids = [new_decision_id() for _ in range(5000)]  # across several refills of the pool
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({i[:8] for i in ids}) > 4900  # no shared prefix
    steps = {(int(b, 16) - int(a, 16)) % (1 << 64) for a, b in __import__("itertools").pairwise(ids)}
    assert len(steps) > 4900  # no counter, no fixed stride
    assert len({i[-4:] for i in ids}) > 3000  # low bits vary too
    r, w = _os.pipe()
    pid = _os.fork()
    if pid == 0:  # the child must not hand out the ids the parent is about to
        _os.write(w, "".join(new_decision_id() for _ in range(4)).encode())
        _os._exit(0)
    _os.waitpid(pid, 0)
    child = _os.read(r, 64).decode()
    parent = "".join(new_decision_id() for _ in range(4))
    assert len(child) == 64 and child != parent
