"""sidecar.client: the WWW-Authenticate parser, the gRPC interceptors (sync and aio) against an
in-process server that answers as the sidecar does through Envoy, and the httpx Auth."""

from __future__ import annotations

import asyncio
import base64
import json
import pickle
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import reasons, response
from sidecar.client import (
    AioStepUpInterceptor,
    Challenge,
    ChallengeParseError,
    StepUpInterceptor,
    StepUpRequired,
    bearer_step_up,
    parse_www_authenticate,
)
from sidecar.client.httpx_auth import StepUpAuth
from sidecar.client.interceptors import ERROR_DOMAIN
from sidecar.decision import Decision
from tests.helpers import ROOT

STEP_UP = "insufficient_user_authentication"


def params_of(value: str | list[str]) -> list[tuple[str, dict[str, str], str | None]]:
    return [(c.scheme, dict(c.params), c.token68) for c in parse_www_authenticate(value)]


# -- the parser -----------------------------------------------------------------------------------

PARSES = [
    (
        "the-sidecars-step-up",
        'Bearer realm="bank", error="insufficient_user_authentication", '
        'error_description="a stronger authentication is required", acr_values="phr phrh", max_age=3600',
        [
            (
                "Bearer",
                {
                    "realm": "bank",
                    "error": STEP_UP,
                    "error_description": "a stronger authentication is required",
                    "acr_values": "phr phrh",
                    "max_age": "3600",
                },
                None,
            )
        ],
    ),
    (
        "two-challenges-in-one-value",
        'Basic realm="x", Bearer error="invalid_token"',
        [("Basic", {"realm": "x"}, None), ("Bearer", {"error": "invalid_token"}, None)],
    ),
    (
        "rfc-9110-example",
        'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
        [
            ("Newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}, None),
            ("Basic", {"realm": "simple"}, None),
        ],
    ),
    (
        "names-case-insensitive-scheme-kept",
        'BEARER Error="x", REALM=y',
        [("BEARER", {"error": "x", "realm": "y"}, None)],
    ),
    ("ows-around-equals", 'Bearer realm = "x" ,error=\ty', [("Bearer", {"realm": "x", "error": "y"}, None)]),
    ("empty-quoted-value", 'Bearer realm=""', [("Bearer", {"realm": ""}, None)]),
    ("escapes", r'Bearer d="a \"q\" \\ \b\,"', [("Bearer", {"d": 'a "q" \\ b,'}, None)]),
    (
        "comma-equals-space-in-quotes",
        'Bearer realm="a, b=c", error="d"',
        [("Bearer", {"realm": "a, b=c", "error": "d"}, None)],
    ),
    (
        "empty-list-elements",
        ' , ,Bearer , realm="x" ,, error=y, ,Basic ,,',
        [("Bearer", {"realm": "x", "error": "y"}, None), ("Basic", {}, None)],
    ),
    (
        "token68",
        "Negotiate YIIB/w+_~.-==, Basic dXNlcg==",
        [("Negotiate", {}, "YIIB/w+_~.-=="), ("Basic", {}, "dXNlcg==")],
    ),
    ("token68-that-looks-like-a-bare-name", "Bearer a=", [("Bearer", {}, "a=")]),
    ("scheme-alone", "Bearer", [("Bearer", {}, None)]),
    ("schemes-alone", "Bearer, Basic", [("Bearer", {}, None), ("Basic", {}, None)]),
    (
        "non-ascii-in-quotes",
        'Bearer error_description="Überweisung ☃"',
        [("Bearer", {"error_description": "Überweisung ☃"}, None)],
    ),
    ("empty-value", "", []),
    ("whitespace-only", " \t ", []),
]


@pytest.mark.parametrize(("value", "expected"), [c[1:] for c in PARSES], ids=[c[0] for c in PARSES])
def test_parse_follows_rfc_9110_auth_param_grammar(value: str, expected: list[Any]) -> None:
    assert params_of(value) == expected


def test_several_header_values_are_parsed_in_order() -> None:
    assert params_of(['Basic realm="x"', "Bearer error=y, Negotiate"]) == [
        ("Basic", {"realm": "x"}, None),
        ("Bearer", {"error": "y"}, None),
        ("Negotiate", {}, None),
    ]


MALFORMED = [
    ("duplicate-parameter", 'Bearer error="invalid_token", error="insufficient_user_authentication"'),
    ("duplicate-in-another-case", "Bearer realm=a, REALM=b"),
    ("unterminated-quote", 'Bearer realm="x'),
    ("escape-at-the-end", 'Bearer realm="x\\"'),
    ("control-character", 'Bearer realm="a\x01b"'),
    ("newline", 'Bearer realm="a\r\nb"'),
    ("missing-value", "Bearer realm=, error=x"),
    ("space-inside-bare-value", "Bearer realm=a b"),
    ("slash-in-bare-value", "Bearer realm=a/b"),
    ("text-after-quoted-value", 'Bearer realm="x"y'),
    ("no-space-after-scheme", 'Bearer"x"'),
    ("starts-with-equals", "=x"),
    ("starts-with-quote", '"Bearer"'),
    ("token68-with-parameters", "Basic dXNlcg==, realm=x"),
    ("equals-without-name", 'Bearer realm="x", ="y"'),
]


@pytest.mark.parametrize("value", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_values_raise_challenge_parse_error(value: str) -> None:
    with pytest.raises(ChallengeParseError) as e:
        parse_www_authenticate(value)
    assert e.value.value == value
    assert 0 <= e.value.position <= len(value)
    assert isinstance(e.value, ValueError)


def test_one_malformed_value_among_several_fails_the_strict_parse() -> None:
    with pytest.raises(ChallengeParseError):
        parse_www_authenticate(['Basic realm="x"', "Bearer realm=a, realm=b"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3600", 3600),
        ("0", 0),
        ("007", 7),
        ("-1", None),
        ("1.5", None),
        ("abc", None),
        ("", None),
        ("٣", None),
        (" 1", None),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, None),
    ],
)
def test_max_age_is_a_non_negative_decimal_or_absent(text: str, expected: int | None) -> None:
    """A max_age that is not 0-9 digits (at most 18) counts as absent; the text stays in params."""
    (c,) = parse_www_authenticate(f'Bearer error="{STEP_UP}", max_age="{text}"')
    assert c.max_age == expected
    assert c.params["max_age"] == text


def test_typed_fields_split_space_separated_lists() -> None:
    (c,) = parse_www_authenticate(
        'Bearer realm="bank", error="insufficient_user_authentication", error_description="d", '
        'acr_values="phr  phrh", scope="payments read", required_amr="hwk pin", max_age=60'
    )
    assert c == Challenge(
        "Bearer",
        error=STEP_UP,
        error_description="d",
        acr_values=("phr", "phrh"),
        max_age=60,
        scope=("payments", "read"),
        realm="bank",
        required_amr=("hwk", "pin"),
        params=c.params,
    )
    assert c.is_step_up


def test_challenge_is_frozen_hashable_and_its_params_read_only() -> None:
    (c,) = parse_www_authenticate('Bearer realm="x"')
    with pytest.raises(FrozenInstanceError):
        c.realm = "y"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.params["realm"] = "y"  # type: ignore[index]
    assert hash(c) == hash(Challenge.from_params("Bearer", {"REALM": "x"}))
    assert c == Challenge.from_params("Bearer", {"REALM": "x"})


def test_bearer_step_up_picks_the_bearer_challenge_with_the_rfc_9470_error() -> None:
    values = [
        'Basic realm="x", Bearer error="invalid_token"',
        f'bearer realm="bank", error="{STEP_UP}", max_age=5',
    ]
    c = bearer_step_up(values)
    assert c is not None and c.scheme == "bearer" and c.max_age == 5


@pytest.mark.parametrize(
    "values",
    [
        'Bearer realm="bank"',
        'Bearer error="invalid_token"',
        f'Basic error="{STEP_UP}"',
        'Bearer error="insufficient_scope", scope="payments"',
        [],
    ],
    ids=["no-error", "invalid-token", "not-bearer", "insufficient-scope", "no-header"],
)
def test_bearer_step_up_is_none_without_a_step_up_challenge(values: Any) -> None:
    assert bearer_step_up(values) is None


def test_bearer_step_up_skips_values_that_do_not_parse() -> None:
    """Lenient: a malformed value (here a repeated error) never counts, the next one still does."""
    assert bearer_step_up(f'Bearer error="{STEP_UP}", error="{STEP_UP}"') is None
    c = bearer_step_up([f'Bearer error="{STEP_UP}", error=x', b"bytes", f'Bearer error="{STEP_UP}"'])  # type: ignore[list-item]
    assert c is not None and c.error == STEP_UP


def test_the_sidecars_own_challenges_parse() -> None:
    """What sidecar/response.py sends for each answer with a challenge reads back as sent."""
    step = _decision("auth_too_old", acr_values=("phr", 'we"ird\\'), max_age=3600)
    (c,) = parse_www_authenticate(response.challenge(step, 'b"ank'))
    assert (c.realm, c.error, c.acr_values, c.max_age) == ('b"ank', STEP_UP, ("phr", 'we"ird\\'), 3600)
    (c,) = parse_www_authenticate(
        response.challenge(_decision("insufficient_scope", scope=("payments",)), "bank")
    )
    assert (c.error, c.scope, c.is_step_up) == ("insufficient_scope", ("payments",), False)
    (c,) = parse_www_authenticate(response.challenge(_decision("token_expired"), "bank"))
    assert (c.error, c.error_description) == ("invalid_token", "the token has expired")


# -- the parser, property-based -------------------------------------------------------------------

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKEN = re.compile(f"[{re.escape(_TCHAR)}]+")
_QDTEXT = st.one_of(
    st.sampled_from('\t "\\,=;'),
    st.characters(min_codepoint=0x21, max_codepoint=0x7E),
    st.characters(min_codepoint=0x80, max_codepoint=0x2FFF),  # no surrogates,
)
_BWS = st.sampled_from(["", " ", "\t", "  \t"])
_SEP = st.sampled_from([", ", ",", " , ", ", , ", ",,\t"])


@st.composite
def _serialised_value(draw: st.DrawFn, value: str) -> str:
    if _TOKEN.fullmatch(value) and draw(st.booleans()):
        return value
    out = []
    for ch in value:
        # Escape what must be; escape any other char now and then (a quoted-pair is allowed).
        out.append("\\" + ch if ch in '"\\' or draw(st.integers(0, 9)) == 0 else ch)
    return '"' + "".join(out) + '"'


@st.composite
def _challenge(draw: st.DrawFn) -> tuple[tuple[str, dict[str, str], str | None], str]:
    scheme = draw(st.text(_TCHAR, min_size=1, max_size=8))
    if draw(st.integers(0, 5)) == 0:
        t68 = draw(st.from_regex(r"[A-Za-z0-9\-._~+/]{1,12}={0,2}", fullmatch=True))
        return (scheme, {}, t68), f"{scheme} {t68}"
    names = draw(st.lists(st.text(_TCHAR, min_size=1, max_size=8).map(str.lower), max_size=5, unique=True))
    params = {n: draw(st.text(_QDTEXT, max_size=12)) for n in names}
    parts = []
    for name, value in params.items():
        spelled = "".join(c.upper() if draw(st.booleans()) else c for c in name)
        parts.append(f"{spelled}{draw(_BWS)}={draw(_BWS)}{draw(_serialised_value(value))}")
    text = scheme
    if parts:
        text += " " + parts[0] + "".join(draw(_SEP) + p for p in parts[1:])
    return (scheme, params, None), text


@given(st.lists(_challenge(), max_size=4), st.data())
@settings(max_examples=300, deadline=None)
def test_round_trip_serialised_challenges_parse_back(challenges: list[Any], data: st.DataObject) -> None:
    """Challenges with any quoted text, escapes, case, BWS and empty list elements, spread over one
    or more header values, parse back to the same schemes, parameters and token68s."""
    texts = [t for _, t in challenges]
    cut = data.draw(st.lists(st.integers(0, len(texts)), max_size=2).map(sorted))
    values, start = [], 0
    for end in [*cut, len(texts)]:
        values.append(data.draw(_SEP).join(texts[start:end]))
        start = end
    assert params_of(values) == [c for c, _ in challenges]


@given(st.one_of(st.text(), st.text(alphabet=' \t,="\\aB=x\x00é')))
@settings(max_examples=500, deadline=None)
def test_any_text_parses_or_raises_challenge_parse_error_only(value: str) -> None:
    try:
        parse_www_authenticate(value)
    except ChallengeParseError:
        pass
    bearer_step_up(value)  # never raises


# -- answers as the sidecar sends them through Envoy ------------------------------------------------


def _decision(code: str, **hints: Any) -> Decision:
    r = reasons.reason(code)
    return Decision(r.outcome, r.code, r.http_status, r.description, error=r.error, **hints)


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str = ""
    trailers: tuple[tuple[str, str | bytes], ...] = ()


OK_ANSWER = Answer(grpc.StatusCode.OK)


def sidecar_answer(
    code: str, *, extra_info: dict[str, str] | None = None, drop: tuple[str, ...] = (), **hints: Any
) -> Answer:
    """What a gRPC client gets through Envoy when the sidecar denies: sidecar/response.py's own
    headers as trailers (the details bin base64-decoded, as the gRPC library does)."""
    denied = response.deny(_decision(code, **hints), "dec-42", "bank", is_grpc=True).denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    status_bin = base64.b64decode(headers["grpc-status-details-bin"])
    if extra_info:
        st_ = status_pb2.Status.FromString(status_bin)
        info = error_details_pb2.ErrorInfo()
        st_.details[0].Unpack(info)
        info.metadata.update(extra_info)
        st_.details[0].Pack(info)
        status_bin = st_.SerializeToString()
    trailers: list[tuple[str, str | bytes]] = []
    if "www-authenticate" in headers and "www-authenticate" not in drop:
        trailers.append(("www-authenticate", headers["www-authenticate"]))
    if "grpc-status-details-bin" not in drop:
        trailers.append(("grpc-status-details-bin", status_bin))
    grpc_code = next(c for c in grpc.StatusCode if c.value[0] == int(headers["grpc-status"]))
    return Answer(grpc_code, denied.body, tuple(trailers))


def _status_bin(info: Any) -> bytes:
    detail = any_pb2.Any()
    detail.Pack(info)
    out: bytes = status_pb2.Status(
        code=code_pb2.UNAUTHENTICATED, message="x", details=[detail]
    ).SerializeToString()
    return out


def _error_info_only(domain: str) -> Answer:
    """A step-up with no challenge header, only the ErrorInfo (e.g. a proxy dropped the header)."""
    info = error_details_pb2.ErrorInfo(reason="INSUFFICIENT_USER_AUTHENTICATION", domain=domain)
    info.metadata.update(
        {"reason": "acr_too_low", "acr_values": "phrh", "max_age": "900", "required_amr": "hwk"}
    )
    return Answer(grpc.StatusCode.UNAUTHENTICATED, "x", (("grpc-status-details-bin", _status_bin(info)),))


ANSWERS: dict[str, Answer] = {
    "strong": OK_ANSWER,
    "weak": sidecar_answer("acr_too_low", acr_values=("phr", "phrh")),
    "stale": sidecar_answer("auth_too_old", max_age=3600),
    "amr": sidecar_answer("amr_missing", acr_values=("phr",), extra_info={"required_amr": "hwk pin"}),
    "header-only": sidecar_answer("acr_too_low", acr_values=("phr",), drop=("grpc-status-details-bin",)),
    "info-only": _error_info_only(ERROR_DOMAIN),
    "other-domain": _error_info_only("elsewhere.example"),
    "expired": sidecar_answer("token_expired"),
    "teller": sidecar_answer("permission_denied"),
    "noscope": sidecar_answer("insufficient_scope", scope=("payments",)),
    "garbled": Answer(
        grpc.StatusCode.UNAUTHENTICATED,
        "x",
        (
            ("www-authenticate", f'Bearer error="{STEP_UP}", error="{STEP_UP}"'),
            ("grpc-status-details-bin", b"\xff\xfe not a status"),
        ),
    ),
}
NO_TOKEN = sidecar_answer("missing_credential")


@dataclass
class FakeEnvoy:
    """An in-process gRPC server: the bearer token picks the answer (ANSWERS); `seen` records the
    authorization values of every attempt."""

    server: grpc.Server
    address: str
    seen: list[list[str]] = field(default_factory=list)

    def answer(self, md: Any, context: grpc.ServicerContext) -> str:
        auth = [v for k, v in md if k == "authorization"]
        self.seen.append(auth)
        token = auth[0].removeprefix("Bearer ") if auth else None
        a = ANSWERS.get(token, NO_TOKEN) if token else NO_TOKEN
        if a.code != grpc.StatusCode.OK:
            context.set_trailing_metadata(a.trailers)
            context.abort(a.code, a.details)
        return token or ""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeEnvoy]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("127.0.0.1:0")
    env = FakeEnvoy(server, f"127.0.0.1:{port}")

    def transfer(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"receipt for " + env.answer(context.invocation_metadata(), context).encode()

    def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        token = env.answer(context.invocation_metadata(), context)
        for i in range(3):
            yield f"{token} {i}".encode()

    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bank.v1.Payments",
                {
                    "Transfer": grpc.unary_unary_rpc_method_handler(transfer),
                    "Watch": grpc.unary_stream_rpc_method_handler(watch),
                },
            )
        ]
    )
    server.start()
    try:
        yield env
    finally:
        server.stop(None)


@pytest.fixture
def env(fake: FakeEnvoy) -> FakeEnvoy:
    fake.seen.clear()
    return fake


class Callback:
    """A reauthenticate callback that records its challenges and returns `tokens` in turn."""

    def __init__(self, *tokens: str | None) -> None:
        self.tokens = list(tokens)
        self.challenges: list[Challenge] = []

    def __call__(self, challenge: Challenge) -> str | None:
        self.challenges.append(challenge)
        return self.tokens.pop(0)


@pytest.fixture
def transfer(env: FakeEnvoy) -> Iterator[Callable[..., Any]]:
    """transfer(interceptor, **call kwargs) -> the response bytes (a sync intercepted channel)."""
    channels: list[grpc.Channel] = []

    def call(interceptor: StepUpInterceptor, **kwargs: Any) -> Any:
        ch = grpc.insecure_channel(env.address)
        channels.append(ch)
        return grpc.intercept_channel(ch, interceptor).unary_unary("/bank.v1.Payments/Transfer")(
            b"50.00", timeout=5, **kwargs
        )

    yield call
    for ch in channels:
        ch.close()


def bearer(*tokens: str) -> list[list[str]]:
    return [[f"Bearer {t}"] for t in tokens]


# -- sync interceptor -----------------------------------------------------------------------------


def test_token_is_sent_and_a_good_call_goes_through_once(transfer: Any, env: FakeEnvoy) -> None:
    cb = Callback()
    assert transfer(StepUpInterceptor(cb, token="strong")) == b"receipt for strong"
    assert env.seen == bearer("strong")
    assert cb.challenges == []


def test_step_up_calls_back_with_the_challenge_and_retries_once_with_the_new_token(
    transfer: Any, env: FakeEnvoy
) -> None:
    """One callback, one retry; the new token replaces the old and is kept for later calls."""
    cb = Callback("strong")
    stepup = StepUpInterceptor(cb, token="weak")
    assert transfer(stepup) == b"receipt for strong"
    assert env.seen == bearer("weak", "strong")
    (c,) = cb.challenges
    assert (c.error, c.acr_values, c.max_age, c.realm) == (STEP_UP, ("phr", "phrh"), None, "bank")
    assert stepup.token == "strong"
    assert transfer(stepup) == b"receipt for strong"
    assert env.seen == bearer("weak", "strong", "strong")


def test_freshness_challenge_reaches_the_callback_with_max_age(transfer: Any) -> None:
    cb = Callback("strong")
    transfer(StepUpInterceptor(cb, token="stale"))
    (c,) = cb.challenges
    assert (c.acr_values, c.max_age) == ((), 3600)


def test_a_retry_answered_with_a_step_up_raises_step_up_required_never_a_second_retry(
    transfer: Any, env: FakeEnvoy
) -> None:
    cb = Callback("weak", "strong")
    with pytest.raises(StepUpRequired) as e:
        transfer(StepUpInterceptor(cb, token="weak"))
    assert len(cb.challenges) == 1
    assert env.seen == bearer("weak", "weak")
    err = e.value
    assert err.retried
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "insufficient_user_authentication: a stronger authentication is required"
    assert [k for k, _ in err.trailing_metadata()] == ["www-authenticate", "grpc-status-details-bin"]
    assert err.challenge.acr_values == ("phr", "phrh")
    assert (err.error_info["reason"], err.error_info["decision_id"]) == ("acr_too_low", "dec-42")
    status = rpc_status.from_call(err)  # existing code reading the google.rpc.Status still works
    assert status is not None and status.code == code_pb2.UNAUTHENTICATED


@pytest.mark.parametrize("cb", [None, Callback(None)], ids=["no-callback", "callback-gives-up"])
def test_without_a_new_token_step_up_required_is_raised_after_one_attempt(
    transfer: Any, env: FakeEnvoy, cb: Callback | None
) -> None:
    with pytest.raises(StepUpRequired) as e:
        transfer(StepUpInterceptor(cb, token="weak"))
    assert env.seen == bearer("weak")
    assert not e.value.retried
    assert e.value.challenge.acr_values == ("phr", "phrh")


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("teller", grpc.StatusCode.PERMISSION_DENIED),
        ("noscope", grpc.StatusCode.PERMISSION_DENIED),
        ("expired", grpc.StatusCode.UNAUTHENTICATED),
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("garbled", grpc.StatusCode.UNAUTHENTICATED),
        ("other-domain", grpc.StatusCode.UNAUTHENTICATED),
    ],
    ids=["permission-denied", "insufficient-scope", "invalid-token", "no-token", "garbled", "other-domain"],
)
def test_denials_and_invalid_tokens_pass_through_unchanged_and_are_never_retried(
    transfer: Any, env: FakeEnvoy, token: str | None, code: grpc.StatusCode
) -> None:
    cb = Callback("strong")
    with pytest.raises(grpc.RpcError) as e:
        transfer(StepUpInterceptor(cb, token=token))
    assert not isinstance(e.value, StepUpRequired)
    assert e.value.code() == code
    assert cb.challenges == []
    assert len(env.seen) == 1


def test_error_info_alone_is_a_step_up_and_supplies_required_amr(transfer: Any) -> None:
    cb = Callback("strong")
    assert transfer(StepUpInterceptor(cb, token="info-only")) == b"receipt for strong"
    (c,) = cb.challenges
    assert (c.scheme, c.error, c.acr_values, c.max_age, c.required_amr) == (
        "Bearer",
        STEP_UP,
        ("phrh",),
        900,
        ("hwk",),
    )


def test_header_alone_is_a_step_up(transfer: Any) -> None:
    cb = Callback("strong")
    transfer(StepUpInterceptor(cb, token="header-only"))
    assert cb.challenges[0].acr_values == ("phr",)


def test_required_amr_from_error_info_joins_the_header_challenge(transfer: Any) -> None:
    cb = Callback("strong")
    transfer(StepUpInterceptor(cb, token="amr"))
    (c,) = cb.challenges
    assert (c.realm, c.acr_values, c.required_amr) == ("bank", ("phr",), ("hwk", "pin"))


def test_the_calls_own_authorization_wins_first_and_is_replaced_on_the_retry(
    transfer: Any, env: FakeEnvoy
) -> None:
    md = (("authorization", "Bearer weak"), ("x-request-id", "r1"))
    assert (
        transfer(StepUpInterceptor(Callback("strong"), token="teller"), metadata=md) == b"receipt for strong"
    )
    assert env.seen == bearer("weak", "strong")


def test_without_a_token_the_call_goes_out_as_it_is(transfer: Any, env: FakeEnvoy) -> None:
    with pytest.raises(grpc.RpcError):
        transfer(StepUpInterceptor(Callback("strong")))
    assert env.seen == [[]]


def test_callback_exceptions_propagate(transfer: Any) -> None:
    def boom(challenge: Challenge) -> str:
        raise LookupError("user closed the login window")

    with pytest.raises(LookupError):
        transfer(StepUpInterceptor(boom, token="weak"))


def test_with_call_and_future_step_up_too(env: FakeEnvoy) -> None:
    with grpc.insecure_channel(env.address) as ch:
        method = grpc.intercept_channel(ch, StepUpInterceptor(Callback("strong"), token="weak")).unary_unary(
            "/bank.v1.Payments/Transfer"
        )
        resp, call = method.with_call(b"", timeout=5)
        assert resp == b"receipt for strong" and call.code() == grpc.StatusCode.OK
        method = grpc.intercept_channel(ch, StepUpInterceptor(token="weak")).unary_unary(
            "/bank.v1.Payments/Transfer"
        )
        fut = method.future(b"", timeout=5)
        assert fut.code() == grpc.StatusCode.UNAUTHENTICATED and fut.done()
        assert isinstance(fut.exception(), StepUpRequired)
        with pytest.raises(StepUpRequired):
            fut.result()


def test_unary_stream_steps_up_before_the_first_message(env: FakeEnvoy) -> None:
    with grpc.insecure_channel(env.address) as ch:
        watch = grpc.intercept_channel(ch, StepUpInterceptor(Callback("strong"), token="weak")).unary_stream(
            "/bank.v1.Payments/Watch"
        )
        call = watch(b"", timeout=5)
        assert list(call) == [b"strong 0", b"strong 1", b"strong 2"]
        assert call.code() == grpc.StatusCode.OK
        assert env.seen == bearer("weak", "strong")

        env.seen.clear()
        cb = Callback("weak")
        watch = grpc.intercept_channel(ch, StepUpInterceptor(cb, token="weak")).unary_stream(
            "/bank.v1.Payments/Watch"
        )
        with pytest.raises(StepUpRequired) as e:
            list(watch(b"", timeout=5))
        assert e.value.retried and len(cb.challenges) == 1 and env.seen == bearer("weak", "weak")

        watch = grpc.intercept_channel(ch, StepUpInterceptor(cb, token="teller")).unary_stream(
            "/bank.v1.Payments/Watch"
        )
        with pytest.raises(grpc.RpcError) as e2:
            list(watch(b"", timeout=5))
        assert e2.value.code() == grpc.StatusCode.PERMISSION_DENIED and not isinstance(
            e2.value, StepUpRequired
        )


def test_step_up_required_pickles(transfer: Any) -> None:
    with pytest.raises(StepUpRequired) as e:
        transfer(StepUpInterceptor(token="stale"))
    copy = pickle.loads(pickle.dumps(e.value))
    assert (copy.challenge, copy.code(), copy.details(), dict(copy.error_info)) == (
        e.value.challenge,
        e.value.code(),
        e.value.details(),
        dict(e.value.error_info),
    )


def test_error_domain_is_the_sidecars() -> None:
    assert ERROR_DOMAIN == response.ERROR_DOMAIN


# -- grpc.aio interceptor -------------------------------------------------------------------------


async def _aio_transfer(address: str, interceptor: AioStepUpInterceptor) -> bytes:
    async with grpc.aio.insecure_channel(address, interceptors=[interceptor]) as ch:
        out: bytes = await ch.unary_unary("/bank.v1.Payments/Transfer")(b"", timeout=5)
        return out


@pytest.mark.parametrize("style", ["async", "sync"])
def test_aio_step_up_retries_once_with_a_sync_or_async_callback(env: FakeEnvoy, style: str) -> None:
    seen: list[Challenge] = []

    async def async_cb(challenge: Challenge) -> str:
        seen.append(challenge)
        await asyncio.sleep(0)
        return "strong"

    def sync_cb(challenge: Challenge) -> str:
        seen.append(challenge)
        return "strong"

    stepup = AioStepUpInterceptor(async_cb if style == "async" else sync_cb, token="stale")
    assert asyncio.run(_aio_transfer(env.address, stepup)) == b"receipt for strong"
    assert env.seen == bearer("stale", "strong")
    assert [c.max_age for c in seen] == [3600]
    assert stepup.token == "strong"


def test_aio_a_retry_answered_with_a_step_up_raises_step_up_required(env: FakeEnvoy) -> None:
    cb = Callback("weak", "strong")
    with pytest.raises(StepUpRequired) as e:
        asyncio.run(_aio_transfer(env.address, AioStepUpInterceptor(cb, token="weak")))
    assert e.value.retried and isinstance(e.value, grpc.aio.AioRpcError)
    assert len(cb.challenges) == 1 and env.seen == bearer("weak", "weak")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.error_info["reason"] == "acr_too_low"


def test_aio_without_a_callback_raises_after_one_attempt(env: FakeEnvoy) -> None:
    with pytest.raises(StepUpRequired) as e:
        asyncio.run(_aio_transfer(env.address, AioStepUpInterceptor(token="weak")))
    assert not e.value.retried and env.seen == bearer("weak")


@pytest.mark.parametrize("token", ["teller", "expired"])
def test_aio_denials_and_invalid_tokens_pass_through(env: FakeEnvoy, token: str) -> None:
    cb = Callback("strong")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(_aio_transfer(env.address, AioStepUpInterceptor(cb, token=token)))
    assert not isinstance(e.value, StepUpRequired)
    assert cb.challenges == [] and len(env.seen) == 1


def test_aio_calls_own_authorization_is_replaced_on_retry(env: FakeEnvoy) -> None:
    async def go() -> bytes:
        async with grpc.aio.insecure_channel(
            env.address, interceptors=[AioStepUpInterceptor(Callback("strong"))]
        ) as ch:
            out: bytes = await ch.unary_unary("/bank.v1.Payments/Transfer")(
                b"", timeout=5, metadata=(("authorization", "Bearer weak"),)
            )
            return out

    assert asyncio.run(go()) == b"receipt for strong"
    assert env.seen == bearer("weak", "strong")


# -- httpx ----------------------------------------------------------------------------------------


HTTP_ANSWERS: dict[str, tuple[str, dict[str, Any]]] = {
    "weak": ("acr_too_low", {"acr_values": ("phr", "phrh")}),
    "stale": ("auth_too_old", {"max_age": 3600}),
    "teller": ("permission_denied", {}),
    "expired": ("token_expired", {}),
}


class FakeHttp:
    """An httpx MockTransport handler that answers as the sidecar does through Envoy's HTTP
    listener (sidecar/response.py's deny, is_grpc=False); the bearer token picks the answer."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, bytes]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization")
        self.seen.append((auth, request.content))
        token = (auth or "").removeprefix("Bearer ")
        if token == "strong":
            return httpx.Response(200, json={"ok": True})
        code, hints = HTTP_ANSWERS.get(token, ("missing_credential", {}))
        denied = response.deny(_decision(code, **hints), "dec-7", "bank", is_grpc=False).denied_response
        headers = [(h.header.key, h.header.value) for h in denied.headers]
        return httpx.Response(int(denied.status.code), headers=headers, content=denied.body.encode())


BODY = {"from": "acc-1", "to": "acc-2", "amount_cents": 5000}


def test_httpx_steps_up_once_and_resends_the_body() -> None:
    handler, cb = FakeHttp(), Callback("strong")
    auth = StepUpAuth(cb, token="weak")
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as http:
        r = http.post("http://bank/v1/transfers", json=BODY)
    assert r.status_code == 200
    assert [a for a, _ in handler.seen] == ["Bearer weak", "Bearer strong"]
    assert handler.seen[0][1] == handler.seen[1][1] and json.loads(handler.seen[1][1]) == BODY
    (c,) = cb.challenges
    assert (c.acr_values, c.max_age) == (("phr", "phrh"), None)
    assert auth.token == "strong"


def test_httpx_a_retry_answered_with_a_step_up_raises_with_the_response() -> None:
    handler, cb = FakeHttp(), Callback("stale", "strong")
    with httpx.Client(transport=httpx.MockTransport(handler), auth=StepUpAuth(cb, token="stale")) as http:
        with pytest.raises(StepUpRequired) as e:
            http.get("http://bank/v1/transfers")
    assert e.value.retried and len(cb.challenges) == 1 and len(handler.seen) == 2
    assert e.value.challenge.max_age == 3600
    assert e.value.response.status_code == 401
    assert e.value.response.json()["reason"] == "auth_too_old"


@pytest.mark.parametrize("cb", [None, Callback(None)], ids=["no-callback", "callback-gives-up"])
def test_httpx_without_a_new_token_raises_after_one_attempt(cb: Callback | None) -> None:
    handler = FakeHttp()
    with httpx.Client(transport=httpx.MockTransport(handler), auth=StepUpAuth(cb, token="weak")) as http:
        with pytest.raises(StepUpRequired) as e:
            http.get("http://bank/x")
    assert not e.value.retried and len(handler.seen) == 1


@pytest.mark.parametrize(("token", "status"), [("teller", 403), ("expired", 401), (None, 401)])
def test_httpx_denials_and_invalid_tokens_are_returned_unchanged(token: str | None, status: int) -> None:
    handler, cb = FakeHttp(), Callback("strong")
    with httpx.Client(transport=httpx.MockTransport(handler), auth=StepUpAuth(cb, token=token)) as http:
        r = http.get("http://bank/x")
    assert r.status_code == status and cb.challenges == [] and len(handler.seen) == 1


def test_httpx_requests_own_authorization_wins_first() -> None:
    handler = FakeHttp()
    with httpx.Client(
        transport=httpx.MockTransport(handler), auth=StepUpAuth(Callback("strong"), token="x")
    ) as h:
        assert h.get("http://bank/x", headers={"Authorization": "Bearer weak"}).status_code == 200
    assert [a for a, _ in handler.seen] == ["Bearer weak", "Bearer strong"]


class Redirecting(FakeHttp):
    """`/go` on http://bank redirects to `target`; every other request is FakeHttp's answer,
    except that any other origin always answers with a step-up challenge."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "bank" and request.url.path == "/go":
            self.seen.append((request.headers.get("authorization"), b"redirect"))
            return httpx.Response(302, headers={"location": self.target})
        if (request.url.scheme, request.url.host, request.url.port or 80) != ("http", "bank", 80):
            self.seen.append((request.headers.get("authorization"), b"foreign"))
            return httpx.Response(
                401,
                headers={"www-authenticate": 'Bearer error="insufficient_user_authentication", acr_values="phrh"'},
            )
        return super().__call__(request)


@pytest.mark.parametrize("target", ["http://evil/x", "https://bank:8443/x", "http://bank:8080/x"])
def test_httpx_a_challenge_from_another_origin_after_a_redirect_is_returned_unchanged(target: str) -> None:
    """httpx gives the flow the last response of the redirects it followed: a foreign server
    must not make the client log in again (and choose its acr_values)."""
    handler, cb = Redirecting(target), Callback("strong")
    with httpx.Client(
        transport=httpx.MockTransport(handler), auth=StepUpAuth(cb, token="weak"), follow_redirects=True
    ) as http:
        r = http.get("http://bank/go")
    assert r.status_code == 401 and str(r.url) == target
    assert cb.challenges == []
    assert [body for _, body in handler.seen] == [b"redirect", b"foreign"]


def test_httpx_a_same_origin_redirect_still_steps_up() -> None:
    handler, cb = Redirecting("http://bank:80/v1/transfers"), Callback("strong")
    with httpx.Client(
        transport=httpx.MockTransport(handler), auth=StepUpAuth(cb, token="weak"), follow_redirects=True
    ) as http:
        r = http.get("http://bank/go")
    assert r.status_code == 200 and len(cb.challenges) == 1
    assert [a for a, _ in handler.seen] == ["Bearer weak", "Bearer weak", "Bearer strong", "Bearer strong"]


@pytest.mark.parametrize(
    ("first", "then", "steps_up"),
    [("http://bank/go", "https://bank/v1/x", True),  # the HTTPS upgrade: httpx keeps the token
     ("http://[FE80::1]/go", "http://[fe80::1]/v1/x", False),  # httpx compares hosts as written
     ("http://bank.example./go", "http://bank.example/v1/x", False),
     ("https://bank/go", "http://bank/v1/x", False)],
)  # fmt: skip
def test_httpx_steps_up_exactly_where_httpx_sends_the_token(first: str, then: str, steps_up: bool) -> None:
    """A challenge is honoured only from a server the token reaches: elsewhere the retry could
    not carry the new token either (httpx strips Authorization on the redirect)."""
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.path == "/go":
            return httpx.Response(302, headers={"location": then})
        if request.headers.get("authorization") == "Bearer strong":
            return httpx.Response(200)
        challenge = 'Bearer error="insufficient_user_authentication", acr_values="phrh"'
        return httpx.Response(401, headers={"www-authenticate": challenge})

    cb = Callback("strong")
    with httpx.Client(
        transport=httpx.MockTransport(handler), auth=StepUpAuth(cb, token="weak"), follow_redirects=True
    ) as http:
        r = http.get(first)
    assert (r.status_code, len(cb.challenges)) == ((200, 1) if steps_up else (401, 0))
    assert seen[1] == (then, "Bearer weak" if steps_up else None)


def test_httpx_async_client_awaits_an_async_callback() -> None:
    handler = FakeHttp()

    async def cb(challenge: Challenge) -> str:
        return "strong"

    async def go() -> int:
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(handler), auth=StepUpAuth(cb, token="weak")
        ) as h:
            return (await h.post("http://bank/v1/transfers", json=BODY)).status_code

    assert asyncio.run(go()) == 200
    assert [a for a, _ in handler.seen] == ["Bearer weak", "Bearer strong"]


def test_httpx_sync_client_refuses_an_async_callback() -> None:
    async def cb(challenge: Challenge) -> str:
        return "strong"

    with httpx.Client(transport=httpx.MockTransport(FakeHttp()), auth=StepUpAuth(cb, token="weak")) as h:
        with pytest.raises(TypeError, match="AsyncClient"):
            h.get("http://bank/x")


def test_sidecar_client_imports_without_httpx() -> None:
    """httpx is an optional extra: only sidecar.client.httpx_auth needs it."""
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "import sidecar.client\n"
        "try:\n    import sidecar.client.httpx_auth\nexcept ImportError:\n    print('no httpx')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "no httpx"
