"""What the sidecar decided, independent of any wire format."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: identity.py imports the reasons, which import Outcome
    from sidecar.assurance import Requirement
    from sidecar.identity import Identity


class Outcome(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    STEP_UP = "step_up"
    UNAUTHENTICATED = "unauthenticated"


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer. `reason` is a stable snake_case code shared by the log, span, metric and body.

    `error` is the RFC 6750 / RFC 9470 error code of the challenge ("" for none), `acr_values` and
    `max_age` the step-up hints, `scope` the scopes of an insufficient_scope answer.
    """

    outcome: Outcome
    reason: str
    http_status: int
    description: str = ""
    error: str = ""
    matched_rules: tuple[str, ...] = ()
    sensitivity: str = ""
    requirement: Requirement | None = None
    identity: Identity | None = None
    acr_values: tuple[str, ...] = ()
    max_age: int | None = None
    scope: tuple[str, ...] = ()
    # The authentication methods a step-up requires (all of them, for clients that show them).
    required_amr: tuple[str, ...] = ()
    path: str = ""
    # Level names, so that the edges (response, log, span, explain) need no policy to print them.
    required_assurance: str = ""
    presented_assurance: str = ""
    # The rule of each table that decided (for coverage and explain); "" when none did.
    sensitivity_rule: str = ""
    permission_rule: str = ""

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


def same_answer(a: Decision, b: Decision) -> bool:
    """Whether two decisions give the caller the same answer: both allow (whatever the reason:
    `public` and `allowed` both let the call through), or both refuse with the same reason and
    challenge."""
    if a.outcome is not b.outcome:
        return False
    if a.outcome is Outcome.ALLOW:
        return True
    return (a.reason, a.acr_values, a.max_age, a.scope) == (b.reason, b.acr_values, b.max_age, b.scope)
