"""`StepUpAuth`: an `httpx.Auth` that sends a bearer token and steps up once on an RFC 9470
challenge. Needs the `httpx` extra (`pip install 'stepup-sidecar[httpx]'`)::

    auth = StepUpAuth(log_in_again, token=access_token)
    with httpx.Client(base_url="http://localhost:10000", auth=auth) as http:
        r = http.post("/v1/transfers", json={"from": "acc-1", "to": "acc-2", "amount_cents": 5000})

- The token goes out as `Authorization: Bearer <token>` unless the request has its own
  Authorization header.
- A 401 whose `WWW-Authenticate` has a Bearer challenge with
  error="insufficient_user_authentication": `reauthenticate(challenge)` is called and the request
  is sent once more with the token it returns (which becomes `token`). `StepUpRequired` (with
  `response` set) is raised when there is no callback, when it returns None, or when the retry
  gets a step-up challenge again.
- Every other response (200, 403, a 401 with error="invalid_token", ...) is returned unchanged,
  and so is a challenge from a server the token does not go to (a redirect followed to another
  host, scheme or port, as httpx compares origins when it strips the Authorization header; the
  HTTPS upgrade of the same host is the one exception httpx makes, and so is it here).

With `httpx.AsyncClient`, `reauthenticate` may also be a coroutine function.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import grpc
import httpx

from sidecar.client.challenge import Challenge, bearer_step_up
from sidecar.client.interceptors import AioReauthenticate, StepUpRequired, _ask


class StepUpAuth(httpx.Auth):
    """Bearer token plus one RFC 9470 step-up per request; see the module docstring."""

    # Bodies are read first: the request's so it can be sent twice, the response's so that
    # StepUpRequired.response can still be read after httpx closed it.
    requires_request_body = True
    requires_response_body = True

    def __init__(self, reauthenticate: AioReauthenticate | None = None, *, token: str | None = None) -> None:
        self.reauthenticate = reauthenticate
        self.token = token

    def _prepare(self, request: httpx.Request) -> None:
        if self.token is not None and "authorization" not in request.headers:
            request.headers["Authorization"] = f"Bearer {self.token}"

    def _retry(
        self, request: httpx.Request, token: str | None, challenge: Challenge, response: httpx.Response
    ) -> None:
        if token is None:
            raise _refusal(challenge, response, retried=False)
        self.token = token
        request.headers["Authorization"] = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._prepare(request)
        response = yield request
        challenge = _step_up(request, response)
        if challenge is None:
            return
        token = self.reauthenticate(challenge) if self.reauthenticate is not None else None
        if token is not None and not isinstance(token, str):
            _close(token)
            raise TypeError("an async reauthenticate callback needs httpx.AsyncClient")
        self._retry(request, token, challenge, response)
        response = yield request
        challenge = _step_up(request, response)
        if challenge is not None:
            raise _refusal(challenge, response, retried=True)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        self._prepare(request)
        response = yield request
        challenge = _step_up(request, response)
        if challenge is None:
            return
        self._retry(request, await _ask(self.reauthenticate, challenge), challenge, response)
        response = yield request
        challenge = _step_up(request, response)
        if challenge is not None:
            raise _refusal(challenge, response, retried=True)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _token_goes_to(original: httpx.URL, final: httpx.URL) -> bool:
    """Whether httpx, following redirects, sends the original request's Authorization header on
    to `final`: the same origin as it compares them (scheme, host as written, port), or the
    HTTPS upgrade of an http:80 URL on the same host."""
    o, f = _origin(original), _origin(final)
    return o == f or (o[1] == f[1] and o[0] == "http" and o[2] == 80 and f[0] == "https" and f[2] == 443)


def _step_up(request: httpx.Request, response: httpx.Response) -> Challenge | None:
    """The step-up challenge of a 401 from a server the token goes to (httpx hands the flow the
    last response of the redirects it followed, which may be another server's: it must not make
    the client log in again, and choose the acr_values)."""
    if response.status_code != 401:
        return None
    if not _token_goes_to(request.url, response.request.url):
        return None
    return bearer_step_up(response.headers.get_list("www-authenticate"))


def _refusal(challenge: Challenge, response: httpx.Response, *, retried: bool) -> StepUpRequired:
    return StepUpRequired(
        challenge,
        code=grpc.StatusCode.UNAUTHENTICATED,
        details=challenge.error_description,
        retried=retried,
        response=response,
    )


def _close(awaitable: object) -> None:
    """Close a coroutine that will not be awaited (no "never awaited" warning)."""
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()
