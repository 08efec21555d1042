"""gRPC client interceptors (sync and `grpc.aio`) that turn a step-up answer into `StepUpRequired`,
or into one retry with a stronger token.

A step-up answer is UNAUTHENTICATED with either signal the sidecar sends through Envoy:

- trailing metadata `www-authenticate` holding a Bearer challenge with
  error="insufficient_user_authentication" (RFC 9470 §3);
- a `google.rpc.Status` in `grpc-status-details-bin` whose `google.rpc.ErrorInfo` has domain
  "stepup-sidecar" and reason "INSUFFICIENT_USER_AUTHENTICATION".

The challenge comes from the header; any of acr_values, max_age, scope, required_amr that it lacks
is taken from the ErrorInfo metadata (space-separated lists; only the ErrorInfo has required_amr).

Everything else (PERMISSION_DENIED, a plain invalid_token, UNAVAILABLE, ...) passes through
unchanged and is never retried.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from sidecar.client.challenge import STEP_UP_ERROR, Challenge, bearer_step_up

ERROR_DOMAIN = "stepup-sidecar"  # = sidecar.response.ERROR_DOMAIN (tests/test_client.py checks)
STEP_UP_REASON = "INSUFFICIENT_USER_AUTHENTICATION"
_HINTS = ("acr_values", "max_age", "scope", "required_amr")

Reauthenticate: TypeAlias = Callable[[Challenge], str | None]
AioReauthenticate: TypeAlias = Callable[[Challenge], str | Awaitable[str | None] | None]
_Metadata: TypeAlias = Any  # a sequence of (key, value) pairs, or grpc.aio.Metadata
_Found: TypeAlias = tuple[Challenge, dict[str, str]]  # the challenge, the ErrorInfo metadata


class StepUpRequired(grpc.aio.AioRpcError):  # type: ignore[misc]
    """The server wants a stronger or more recent authentication: see `challenge` (acr_values,
    max_age, ...). `retried` is True when a token from `reauthenticate` was tried and was still
    not enough.

    A `grpc.RpcError` (code(), details(), initial_metadata(), trailing_metadata() are those of the
    call that failed), so existing `except grpc.RpcError` code keeps working. `error_info` is the
    ErrorInfo metadata (reason, decision_id, ...; empty if none came); `response` is the HTTP
    response for `sidecar.client.httpx_auth.StepUpAuth`, else None."""

    def __init__(
        self,
        challenge: Challenge,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
        details: str | None = None,
        initial_metadata: _Metadata = None,
        trailing_metadata: _Metadata = None,
        debug_error_string: str | None = None,
        error_info: Mapping[str, str] | None = None,
        retried: bool = False,
        response: Any = None,
    ) -> None:
        super().__init__(code, initial_metadata, trailing_metadata, details, debug_error_string)
        self.challenge = challenge
        self.error_info: Mapping[str, str] = MappingProxyType(dict(error_info or {}))
        self.retried = retried
        self.response = response

    def __reduce__(self) -> tuple[Any, ...]:
        # AioRpcError's assumes its own constructor; metadata becomes plain (key, value) tuples.
        def plain(md: _Metadata) -> _Metadata:
            return None if md is None else tuple((k, v) for k, v in md)

        kwargs = {
            "code": self.code(),
            "details": self.details(),
            "initial_metadata": plain(self.initial_metadata()),
            "trailing_metadata": plain(self.trailing_metadata()),
            "debug_error_string": self.debug_error_string(),
            "error_info": dict(self.error_info),
            "retried": self.retried,
        }
        return (functools.partial(type(self), self.challenge, **kwargs), ())


def _step_up(code: grpc.StatusCode | None, trailing_metadata: _Metadata) -> _Found | None:
    """(challenge, ErrorInfo metadata) if a call's status and trailers are a step-up, else None."""
    if code != grpc.StatusCode.UNAUTHENTICATED:
        return None
    pairs = list(trailing_metadata or ())
    header = bearer_step_up([v for k, v in pairs if k == "www-authenticate"])
    info = _error_info(pairs)
    meta = dict(info.metadata) if info is not None else {}
    from_info = info is not None and info.reason == STEP_UP_REASON
    if header is None and not from_info:
        return None
    hinted = Challenge.from_params(
        "Bearer", {"error": STEP_UP_ERROR, **{k: meta[k] for k in _HINTS if k in meta and from_info}}
    )
    if header is None:
        return hinted, meta
    merged = replace(
        header,
        acr_values=header.acr_values or hinted.acr_values,
        max_age=header.max_age if header.max_age is not None else hinted.max_age,
        scope=header.scope or hinted.scope,
        required_amr=header.required_amr or hinted.required_amr,
    )
    return merged, meta


def _error_info(pairs: list[tuple[str, Any]]) -> Any:
    """The sidecar's google.rpc.ErrorInfo from grpc-status-details-bin, or None (also if garbled)."""
    for key, value in pairs:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                    return info
        except DecodeError:
            return None
    return None


def _with_bearer(metadata: _Metadata, token: str) -> list[tuple[str, Any]]:
    """The call's metadata with every authorization entry replaced by one `Bearer <token>`."""
    kept = [(k, v) for k, v in metadata or () if k.lower() != "authorization"]
    return [*kept, ("authorization", f"Bearer {token}")]


def _has_authorization(metadata: _Metadata) -> bool:
    return any(k.lower() == "authorization" for k, _ in metadata or ())


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    """A copy of a call's details with other metadata (sync and aio read the same attributes)."""

    def __init__(self, base: Any, metadata: _Metadata) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = getattr(base, "compression", None)


class _TokenHolder:
    """The token state both interceptors share: the initial `token`, replaced by every token
    `reauthenticate` returns, so that later calls go out with the stronger one."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def first_metadata(self, metadata: _Metadata) -> list[tuple[str, Any]] | None:
        """The first attempt's metadata: the call's own authorization wins; else our token, if any
        (None: send the call as it is)."""
        if self.token is None or _has_authorization(metadata):
            return None
        return _with_bearer(metadata, self.token)


# -- sync ---------------------------------------------------------------------------------------


class _TokenProperty:
    """`token`: the bearer token the interceptor sends (None: the call's own, if any)."""

    _holder: _TokenHolder

    @property
    def token(self) -> str | None:
        return self._holder.token

    @token.setter
    def token(self, value: str | None) -> None:
        self._holder.token = value


class StepUpInterceptor(
    _TokenProperty,
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    """Steps up unary-unary and unary-stream calls of a sync channel:
    `grpc.intercept_channel(channel, StepUpInterceptor(reauthenticate, token=...))`.

    - `token`: sent as `authorization: Bearer <token>` on calls that carry no authorization
      metadata of their own; the attribute `token` can be set at any time (e.g. after a refresh).
    - On a step-up answer, `reauthenticate(challenge)` is called (if given) and must return a new
      access token, or None to give up. The call is retried once with that token in place of its
      authorization metadata (same timeout, counted afresh); the token becomes `token`.
    - `StepUpRequired` is raised when there is no callback, when it returns None, or when the retry
      is answered with a step-up again (`retried=True`). Exceptions of the callback propagate.
    - Calls are never retried for anything else.

    `.future()` calls wait for the first attempt inside the interceptor (to know whether to retry).
    A unary-stream call steps up when it is first iterated, if it failed before any message.
    `reauthenticate` runs once per call that needs it: concurrent calls may each prompt."""

    def __init__(self, reauthenticate: Reauthenticate | None = None, *, token: str | None = None) -> None:
        self.reauthenticate = reauthenticate
        self._holder = _TokenHolder(token)

    def _first(self, details: Any) -> Any:
        md = self._holder.first_metadata(details.metadata)
        return details if md is None else _Details(details, tuple(md))

    def _new_token(self, found: _Found, failed: Any) -> str:
        """Ask for a stronger token; StepUpRequired if there is no callback or it gives up."""
        token = self.reauthenticate(found[0]) if self.reauthenticate is not None else None
        if token is None:
            raise _refusal(found, failed, retried=False)
        self._holder.token = token
        return token

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        outcome = continuation(self._first(client_call_details), request)
        found = _step_up(outcome.code(), outcome.trailing_metadata())
        if found is None:
            return outcome
        try:
            token = self._new_token(found, outcome)
        except StepUpRequired as e:
            return _Failed(e)
        retry = _Details(client_call_details, tuple(_with_bearer(client_call_details.metadata, token)))
        outcome = continuation(retry, request)
        found = _step_up(outcome.code(), outcome.trailing_metadata())
        return outcome if found is None else _Failed(_refusal(found, outcome, retried=True))

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return _SteppingStream(self, continuation, client_call_details, request)


def _refusal(found: _Found, call: Any, *, retried: bool) -> StepUpRequired:
    debug = getattr(call, "debug_error_string", None)
    return StepUpRequired(
        found[0],
        code=call.code(),
        details=call.details(),
        initial_metadata=call.initial_metadata(),
        trailing_metadata=call.trailing_metadata(),
        debug_error_string=debug() if callable(debug) else None,
        error_info=found[1],
        retried=retried,
    )


class _Failed(grpc.Call, grpc.Future):  # type: ignore[misc]
    """A finished call that failed with StepUpRequired: what the sync interceptor API expects
    (`with_call` raises `result()`'s exception, `.future()` hands the object out)."""

    def __init__(self, error: StepUpRequired) -> None:
        self._error = error

    def initial_metadata(self) -> _Metadata:
        return self._error.initial_metadata()

    def trailing_metadata(self) -> _Metadata:
        return self._error.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._error.code()

    def details(self) -> str | None:
        details: str | None = self._error.details()
        return details

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self._error

    def exception(self, timeout: float | None = None) -> StepUpRequired:
        return self._error

    def traceback(self, timeout: float | None = None) -> Any:
        return self._error.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)


class _SteppingStream:
    """A unary-stream call that, if it fails with a step-up before its first message, steps up
    and continues with the retried call. Anything else is the current call's (via __getattr__)."""

    def __init__(self, owner: StepUpInterceptor, continuation: Any, details: Any, request: Any) -> None:
        self._owner = owner
        self._continuation = continuation
        self._details = details
        self._request = request
        self._call = continuation(owner._first(details), request)
        self._received = False
        self._retried = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._call)
        except grpc.RpcError as e:
            found = None if self._received else _step_up(e.code(), e.trailing_metadata())
            if found is None:
                raise
            if self._retried:
                raise _refusal(found, e, retried=True) from e
            token = self._owner._new_token(found, e)
            self._retried = True
            retry = _Details(self._details, tuple(_with_bearer(self._details.metadata, token)))
            self._call = self._continuation(retry, self._request)
            return next(self)
        self._received = True
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


# -- grpc.aio -----------------------------------------------------------------------------------


class AioStepUpInterceptor(_TokenProperty, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """`StepUpInterceptor` for `grpc.aio` unary-unary calls:
    `grpc.aio.insecure_channel(target, interceptors=[AioStepUpInterceptor(reauthenticate)])`.

    Same rules; `reauthenticate` may be a plain function or a coroutine function. Unary-stream
    calls of an aio channel are not intercepted."""

    def __init__(self, reauthenticate: AioReauthenticate | None = None, *, token: str | None = None) -> None:
        self.reauthenticate = reauthenticate
        self._holder = _TokenHolder(token)

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        md = self._holder.first_metadata(client_call_details.metadata)
        first = client_call_details if md is None else _Details(client_call_details, grpc.aio.Metadata(*md))
        call = await continuation(first, request)
        found = await _aio_step_up(call)
        if found is None:
            return call
        token = await _ask(self.reauthenticate, found[0])
        if token is None:
            raise await _aio_refusal(found, call, retried=False)
        self._holder.token = token
        md = _with_bearer(client_call_details.metadata, token)
        call = await continuation(_Details(client_call_details, grpc.aio.Metadata(*md)), request)
        found = await _aio_step_up(call)
        if found is None:
            return call
        raise await _aio_refusal(found, call, retried=True)


async def _ask(reauthenticate: AioReauthenticate | None, challenge: Challenge) -> str | None:
    """What `reauthenticate` returns, awaited if it is a coroutine (None without a callback)."""
    token = reauthenticate(challenge) if reauthenticate is not None else None
    if token is None or isinstance(token, str):
        return token
    return await token


async def _aio_step_up(call: Any) -> _Found | None:
    code = await call.code()
    if code != grpc.StatusCode.UNAUTHENTICATED:
        return None
    return _step_up(code, await call.trailing_metadata())


async def _aio_refusal(found: _Found, call: Any, *, retried: bool) -> StepUpRequired:
    return StepUpRequired(
        found[0],
        code=await call.code(),
        details=await call.details(),
        initial_metadata=await call.initial_metadata(),
        trailing_metadata=await call.trailing_metadata(),
        debug_error_string=await call.debug_error_string(),
        error_info=found[1],
        retried=retried,
    )
