"""Every reason code the sidecar can answer with, defined once.

A reason is a stable snake_case code with its outcome, HTTP status, the RFC 6750 / RFC 9470
error of its challenge ("" for none) and a default description. The engine, the response builder,
the decision log, the metrics and the README's decision table all use these; a test checks that
every code here is documented and every documented code is here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.decision import Outcome


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    outcome: Outcome
    http_status: int
    error: str
    description: str
    step: int  # the row of the decision table (README "What the sidecar answers")


REASONS: dict[str, Reason] = {}


def _reason(code: str, outcome: Outcome, status: int, error: str, description: str, step: int) -> Reason:
    r = Reason(code, outcome, status, error, description, step)
    assert code not in REASONS, code
    REASONS[code] = r
    return r


_D, _A, _U, _S = Outcome.DENY, Outcome.ALLOW, Outcome.UNAUTHENTICATED, Outcome.STEP_UP
_BAD = "invalid_request"
_TOKEN = "invalid_token"  # noqa: S105 (an RFC 6750 error code)

# 0. Malformed requests.
INVALID_PATH = _reason("invalid_path", _D, 400, _BAD, "the path is not canonical or not safe", 0)
INVALID_HEADER = _reason("invalid_header", _D, 400, _BAD, "a header is malformed", 0)
INVALID_METHOD = _reason("invalid_method", _D, 400, _BAD, "missing or invalid method", 0)
AMBIGUOUS_CREDENTIALS = _reason(
    "ambiguous_credentials", _D, 400, _BAD, "more than one credential was presented", 0
)
MALFORMED_REQUEST = _reason(
    "malformed_request", _D, 400, _BAD, "the CheckRequest could not be parsed", 0
)
# 1. No rule.
NO_MATCHING_RULE = _reason("no_matching_rule", _D, 403, "", "no rule covers this operation", 1)
UNKNOWN_SENSITIVITY = _reason(
    "unknown_sensitivity", _D, 403, "", "the route names an unknown sensitivity level", 1
)
# 2. Public.
PUBLIC = _reason("public", _A, 200, "", "", 2)
# 3. Credentials.
MISSING_CREDENTIAL = _reason("missing_credential", _U, 401, "", "authentication is required", 3)
MALFORMED_TOKEN = _reason("malformed_token", _U, 401, _TOKEN, "the token is not a well-formed JWT", 3)
INVALID_CLAIM = _reason("invalid_claim", _U, 401, _TOKEN, "a claim of the token is invalid", 3)
UNKNOWN_ISSUER = _reason("unknown_issuer", _U, 401, _TOKEN, "the token's issuer is not trusted", 3)
DISALLOWED_ALGORITHM = _reason(
    "disallowed_algorithm", _U, 401, _TOKEN, "the token's algorithm is not allowed for its issuer", 3
)
UNKNOWN_KEY = _reason("unknown_key", _U, 401, _TOKEN, "the token's signing key is not known", 3)
BAD_SIGNATURE = _reason("bad_signature", _U, 401, _TOKEN, "the token's signature does not verify", 3)
WRONG_AUDIENCE = _reason("wrong_audience", _U, 401, _TOKEN, "the token is not meant for this audience", 3)
TOKEN_EXPIRED = _reason("token_expired", _U, 401, _TOKEN, "the token has expired", 3)
TOKEN_NOT_YET_VALID = _reason("token_not_yet_valid", _U, 401, _TOKEN, "the token is not valid yet", 3)
TOKEN_ISSUED_IN_FUTURE = _reason(
    "token_issued_in_future", _U, 401, _TOKEN, "the token's 'iat' lies in the future", 3
)
# 4. Permission table.
PERMISSION_DENIED = _reason("permission_denied", _D, 403, "", "the caller may not call this operation", 4)
INSUFFICIENT_SCOPE = _reason(
    "insufficient_scope", _D, 403, "insufficient_scope", "the token lacks a required scope", 4
)
# 5. Step-up.
_STEP = "insufficient_user_authentication"
ACR_TOO_LOW = _reason("acr_too_low", _S, 401, _STEP, "a stronger authentication is required", 5)
AUTH_TOO_OLD = _reason("auth_too_old", _S, 401, _STEP, "a more recent authentication is required", 5)
AMR_MISSING = _reason("amr_missing", _S, 401, _STEP, "another authentication method is required", 5)
# 6. Allow.
ALLOWED = _reason("allowed", _A, 200, "", "", 6)
WORKLOAD_GRANTED = _reason("workload_granted", _A, 200, "", "", 6)
# Any step: the sidecar failed (fail closed).
INTERNAL_ERROR = _reason("internal_error", _D, 403, "", "the request could not be evaluated", -1)


def reason(code: str) -> Reason:
    """The registered reason for `code` (KeyError for a code that is not registered)."""
    return REASONS[code]
