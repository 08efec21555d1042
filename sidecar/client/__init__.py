"""Client side of step-up (RFC 9470): parse the challenge, re-authenticate, retry once.

A gRPC client that steps up (`log_in_again` sends the user to the identity provider with the
challenge's acr_values / max_age and returns the new access token, or None to give up)::

    import grpc
    from sidecar.client import Challenge, StepUpInterceptor, StepUpRequired

    def log_in_again(challenge: Challenge) -> str | None:
        return idp.authorize(acr_values=challenge.acr_values, max_age=challenge.max_age)

    stepup = StepUpInterceptor(log_in_again, token=password_token)
    channel = grpc.intercept_channel(grpc.insecure_channel("localhost:10000"), stepup)
    try:
        receipt = bank_pb2_grpc.PaymentsStub(channel).Transfer(transfer, timeout=60)
    except StepUpRequired as e:  # declined, or the new token was still not enough
        print("step-up failed:", e.challenge.acr_values, e.challenge.max_age, e.retried)

- `parse_www_authenticate`, `bearer_step_up`, `Challenge`, `ChallengeParseError`: the RFC 9110
  §11 challenge grammar (sidecar/client/challenge.py says how edge cases are read).
- `StepUpInterceptor` (sync unary-unary and unary-stream), `AioStepUpInterceptor` (grpc.aio
  unary-unary), `StepUpRequired` (a grpc.RpcError): sidecar/client/interceptors.py.
- `sidecar.client.httpx_auth.StepUpAuth`: the same for httpx (the `httpx` extra; not imported
  here, so this package needs only grpcio).

Only UNAUTHENTICATED / 401 answers whose challenge says error="insufficient_user_authentication"
are stepped up; a denial (PERMISSION_DENIED / 403) or an invalid token passes through unchanged.
"""

from __future__ import annotations

from sidecar.client.challenge import (
    STEP_UP_ERROR,
    Challenge,
    ChallengeParseError,
    bearer_step_up,
    parse_www_authenticate,
)
from sidecar.client.interceptors import (
    AioReauthenticate,
    AioStepUpInterceptor,
    Reauthenticate,
    StepUpInterceptor,
    StepUpRequired,
)

__all__ = [
    "STEP_UP_ERROR",
    "AioReauthenticate",
    "AioStepUpInterceptor",
    "Challenge",
    "ChallengeParseError",
    "Reauthenticate",
    "StepUpInterceptor",
    "StepUpRequired",
    "bearer_step_up",
    "parse_www_authenticate",
]
