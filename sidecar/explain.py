"""The Explain service's answer: a decision with what it was made of (requirement, presented
identity), for operators asking "why was this request refused?"."""

from __future__ import annotations

from typing import Any

from sidecar import response
from sidecar.decision import Decision
from sidecar.policy import Policy

from sidecar._proto.stepup.v1 import explain_pb2  # isort: skip


def explain_response(d: Decision, p: Policy, decision_id: str, now: float) -> Any:
    req = d.requirement
    ident = d.identity
    requirement = explain_pb2.Requirement()
    if req is not None:
        requirement = explain_pb2.Requirement(
            sensitivity=req.sensitivity,
            min_assurance=d.required_assurance,
            max_age_seconds=req.max_age or 0,
            required_amr=sorted(req.required_amr),
            risk_rules=list(req.risk_rules),
        )
    elif d.sensitivity:
        requirement.sensitivity = d.sensitivity
    presented = explain_pb2.Presented(credential="none", auth_age_seconds=-1)
    if ident is not None:
        presented = explain_pb2.Presented(
            subject=ident.subject,
            issuer=ident.issuer,
            principal=ident.principal,
            assurance=d.presented_assurance,
            acr=" ".join(ident.acr),
            amr=list(ident.amr),
            auth_age_seconds=int(now - ident.auth_time) if ident.auth_time is not None else -1,
            credential=ident.credential,
        )
    return explain_pb2.ExplainResponse(
        outcome=d.outcome.value,
        reason=d.reason,
        http_status=d.http_status,
        description=d.description,
        matched_rules=list(d.matched_rules),
        requirement=requirement,
        presented=presented,
        www_authenticate=response.challenge(d, p.realm),
        policy_version=p.version,
        decision_id=decision_id,
        normalized_path=d.path,
    )
