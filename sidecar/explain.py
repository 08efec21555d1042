"""Why a request got its answer: the decision as the pipeline walked it.

`walk` turns one evaluation into plain data: the operation and the sensitivity rule that won (and
those it beat), the identity (subject, issuer, roles, groups, scopes, level and how it was
derived), every permission rule that matched the operation and why it did or did not grant, the
requirement (level, max age, methods, the risk rules and whether they fired) and the answer with
its exact headers. `stepup-sidecar explain` prints it (text or JSON); the gRPC Explain service
returns the same content as an ExplainResponse.
"""

from __future__ import annotations

from typing import Any

from sidecar import response
from sidecar.engine import subject_view
from sidecar.runtime import Evaluation, wire_answer

from sidecar._proto.stepup.v1 import explain_pb2  # isort: skip


def walk(ev: Evaluation, decision_id: str, now: float) -> dict[str, Any]:
    d, p, a = ev.decision, ev.policy, ev.attrs
    resp = wire_answer(ev, decision_id)
    if resp.status.code == 0:
        headers = {h.header.key: h.header.value for h in resp.ok_response.headers}
        removed = list(resp.ok_response.headers_to_remove)
    else:
        headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
        removed = []
    out: dict[str, Any] = {
        "policy_version": p.version,
        "decision_id": decision_id,
        "request": {},
        "operation": {"sensitivity": d.sensitivity, "candidates": []},
        "identity": None,
        "permissions": [],
        "requirement": None,
        "risk": [],
        "answer": {
            "outcome": d.outcome.value,
            "reason": d.reason,
            "status": d.http_status,
            "description": d.description,
            "www_authenticate": response.challenge(d, p.realm),
            "headers": headers,
            "removed_headers": removed,
        },
    }
    if a is None:
        return out
    out["request"] = {
        "method": a.method,
        "raw_path": a.raw_path,
        "path": a.path,
        "grpc": a.is_grpc,
        "principal": a.principal,
        "source": a.source_ip,
        "context_extensions": dict(a.context_extensions),
    }
    if a.path and not a.path_error:
        path = a.path if p.case_sensitive_paths else a.path.lower()
        paths = [path, path[:-1]] if len(path) > 1 and path.endswith("/") else [path]
        for reading in paths:
            for i, srule in enumerate(p.tables.sensitivity_candidates(a.method, reading)):
                out["operation"]["candidates"].append(
                    {"rule": srule.id, "level": srule.level, "won": i == 0, "path": reading}
                )
        ident = d.identity
        if ident is not None:
            view = subject_view(ident, a.principal)
            for reading in paths:
                for prule in p.tables.permission_candidates(a.method, reading):
                    missing = list(prule.missing(view))
                    out["permissions"].append({"rule": prule.id, "granted": not missing, "missing": missing})
    ident = d.identity
    if ident is not None:
        out["identity"] = {
            "credential": ident.credential,
            "subject": ident.subject,
            "issuer": ident.issuer,
            "principal": ident.principal,
            "roles": sorted(ident.roles),
            "groups": sorted(ident.groups),
            "scopes": sorted(ident.scopes),
            "acr": list(ident.acr),
            "amr": list(ident.amr),
            "auth_age_seconds": int(now - ident.auth_time) if ident.auth_time is not None else None,
            "level": d.presented_assurance,
            "level_source": ident.level_source,
        }
    req = d.requirement
    if req is not None and not req.public:
        out["requirement"] = {
            "min_assurance": d.required_assurance,
            "max_age_seconds": req.max_age,
            "required_amr": sorted(req.required_amr),
            "risk_rules": list(req.risk_rules),
        }
    for risk in p.risk_rules:
        out["risk"].append(
            {
                "rule": risk.id,
                "fired": risk.condition.fires(a, now),
                "raise_by": risk.raise_by,
                "max_age_seconds": risk.max_age,
            }
        )
    return out


def text(w: dict[str, Any]) -> str:
    """The walk for people, one step a paragraph."""
    lines: list[str] = []
    r, ans = w["request"], w["answer"]
    if r:
        lines.append(f"request     {r['method']} {r['raw_path']}" + ("  (gRPC)" if r["grpc"] else ""))
        if r["path"] and r["path"] != r["raw_path"]:
            lines.append(f"            decided as {r['path']}")
        extra = [
            f"principal {r['principal']}" if r["principal"] else "",
            f"source {r['source']}" if r["source"] else "",
        ]
        if any(extra):
            lines.append("            " + ", ".join(x for x in extra if x))
    cands = w["operation"]["candidates"]
    if cands:
        lines.append("operation   sensitivity rules matching, most specific first:")
        for c in cands:
            mark = "->" if c["won"] else "  "
            lines.append(
                f"            {mark} {c['rule']} (level {c['level']})" + ("" if c["won"] else ", beaten")
            )
    elif r:
        lines.append("operation   no sensitivity rule covers it")
    ident = w["identity"]
    if ident is not None:
        if ident["credential"] == "mtls":
            lines.append(f"identity    workload {ident['principal']} (mTLS), no end-user token")
        else:
            age = ident["auth_age_seconds"]
            lines.append(f"identity    {ident['subject']} from {ident['issuer']} ({ident['credential']})")
            held = [f"{k} {', '.join(ident[k]) or '-'}" for k in ("roles", "groups", "scopes")]
            lines.append("            " + "; ".join(held))
            lines.append(
                f"            level {ident['level'] or 'none'}"
                + (f" from {ident['level_source']}" if ident["level_source"] else "")
                + f" (acr {' '.join(ident['acr']) or '-'}, amr {' '.join(ident['amr']) or '-'})"
                + (f", authenticated {age} s ago" if age is not None else ", no auth_time")
            )
    elif r and ans["reason"] not in ("public", "no_matching_rule") and ans["status"] != 400:
        lines.append("identity    none presented")
    if w["permissions"]:
        lines.append("permission  rules matching the operation:")
        for v in w["permissions"]:
            verdict = "grants" if v["granted"] else f"does not grant (missing: {', '.join(v['missing'])})"
            lines.append(f"            {v['rule']}: {verdict}")
    req = w["requirement"]
    if req is not None:
        parts = [f"level {req['min_assurance']}" if req["min_assurance"] else "no minimum level"]
        if req["max_age_seconds"] is not None:
            parts.append(f"authenticated within {req['max_age_seconds']} s")
        if req["required_amr"]:
            parts.append(f"methods {', '.join(req['required_amr'])}")
        lines.append(f"requirement {'; '.join(parts)}")
    for risk in w["risk"]:
        if risk["fired"]:
            capped = f", max age {risk['max_age_seconds']} s" if risk["max_age_seconds"] is not None else ""
            lines.append(f"risk        {risk['rule']} fired: +{risk['raise_by']} level(s){capped}")
        else:
            lines.append(f"risk        {risk['rule']} did not fire")
    lines.append(
        f"answer      {ans['outcome']} ({ans['reason']}), HTTP {ans['status']}: {ans['description']}"
    )
    for k, v in ans["headers"].items():
        lines.append(f"            {k}: {v}")
    for k in ans["removed_headers"]:
        lines.append(f"            (removed) {k}")
    return "\n".join(lines)


def explain_response(ev: Evaluation, decision_id: str, now: float) -> Any:
    """The gRPC Explain answer: the same walk as an ExplainResponse."""
    w = walk(ev, decision_id, now)
    d, p = ev.decision, ev.policy
    req, ident = d.requirement, d.identity
    requirement = explain_pb2.Requirement(sensitivity=d.sensitivity)
    if req is not None:
        requirement = explain_pb2.Requirement(
            sensitivity=req.sensitivity,
            min_assurance=d.required_assurance,
            max_age_seconds=req.max_age or 0,
            required_amr=sorted(req.required_amr),
            risk_rules=list(req.risk_rules),
        )
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
            roles=sorted(ident.roles),
            groups=sorted(ident.groups),
            scopes=sorted(ident.scopes),
            level_source=ident.level_source,
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
        sensitivity_rules=[
            explain_pb2.SensitivityCandidate(rule=c["rule"], level=c["level"], won=c["won"])
            for c in w["operation"]["candidates"]
        ],
        permissions=[
            explain_pb2.PermissionVerdict(rule=v["rule"], granted=v["granted"], missing=v["missing"])
            for v in w["permissions"]
        ],
        risks=[
            explain_pb2.RiskVerdict(
                rule=r["rule"],
                fired=r["fired"],
                raise_by=r["raise_by"],
                max_age_seconds=r["max_age_seconds"] or 0,
            )
            for r in w["risk"]
        ],
        headers=w["answer"]["headers"],
        removed_headers=w["answer"]["removed_headers"],
    )
