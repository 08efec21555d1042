"""A candidate policy (`serve --candidate`): decided beside the active one on every Check, on the
same verified identity, never enforced; disagreements logged, traced and counted; loaded and
reloaded by the rules of a reload, so a broken candidate never touches the active policy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.compiler import load_policy_text
from sidecar.keys import KeyStore
from sidecar.policy import Policy
from sidecar.runtime import PolicyWatcher
from tests.helpers import ACR_PHR, EXAMPLE_POLICY, check_request, example_policy_text, make_token
from tests.test_server import Running

TRANSFER = "/bank.v1.Payments/Transfer"
BALANCE = "/bank.v1.Accounts/GetBalance"
# The candidate tightens transfers from `high` (aal2_phr, 1h) to `critical` (aal3, 15m).
TIGHTER = ('match: ["/bank.v1.Payments/Transfer", "POST /v1/transfers"], level: high', 'match: ["/bank.v1.Payments/Transfer", "POST /v1/transfers"], level: critical')


def candidate_policy(keys: KeyStore, *replacements: tuple[str, str]) -> Policy:
    """Compiled against the serving process's key store, as `serve --candidate` does."""
    return load_policy_text(
        example_policy_text(*replacements).replace("name: bank-demo", "name: bank-next"),
        base_dir=EXAMPLE_POLICY.parent,
        keys=keys,
    )


@pytest.fixture
def srv() -> Iterator[Running]:
    r = Running()
    r.runtime.swap_candidate(candidate_policy(r.runtime.keys, TIGHTER))
    yield r
    r.stop()


def _disagreements(r: Running, active: str, candidate: str, reason: str) -> float:
    labels = {"active": active, "candidate": candidate, "reason": reason}
    return r.metrics.registry.get_sample_value("stepup_candidate_disagreements_total", labels) or 0.0


def test_a_tighter_candidate_is_decided_logged_counted_and_traced_but_never_enforced(srv: Running) -> None:
    resp = srv.check(check_request(TRANSFER, token=make_token(acr=ACR_PHR)))
    assert resp.status.code == 0 and resp.HasField("ok_response")  # the active policy answers
    line = srv.log_lines()[-1]
    cand_version = srv.runtime.candidate_policy.version
    assert cand_version.startswith("bank-next@") and line["policy_version"].startswith("bank-demo@")
    assert line["outcome"] == "allow"
    assert line["candidate"] == {
        "outcome": "step_up", "reason": "acr_too_low", "http_status": 401,
        "policy_version": cand_version, "agrees": False,
    }  # fmt: skip
    assert _disagreements(srv, "allow", "step_up", "acr_too_low") == 1
    span = srv.exporter.get_finished_spans()[-1]
    assert span.attributes["authz.decision_id"] == line["decision_id"]
    assert span.attributes["authz.candidate.outcome"] == "step_up"
    assert span.attributes["authz.candidate.reason"] == "acr_too_low"
    assert span.attributes["authz.candidate.agrees"] is False
    assert span.attributes["authz.candidate.policy_version"] == cand_version


def test_agreement_is_logged_and_traced_as_such_and_not_counted(srv: Running) -> None:
    srv.check(check_request(BALANCE, token=make_token()))
    line = srv.log_lines()[-1]
    assert line["candidate"]["agrees"] is True and line["candidate"]["outcome"] == "allow"
    assert srv.exporter.get_finished_spans()[-1].attributes["authz.candidate.agrees"] is True
    total = sum(
        s.value
        for m in srv.metrics.registry.collect()
        if m.name == "stepup_candidate_disagreements"
        for s in m.samples
        if s.name.endswith("_total")
    )
    assert total == 0


def test_the_candidate_decides_on_the_same_verified_identity(srv: Running) -> None:
    v = srv.runtime.verifier
    before = v.verifications
    srv.check(check_request(TRANSFER, token=make_token(sub="dave", acr=ACR_PHR)))
    assert v.verifications == before + 1  # once, for both policies


def test_without_a_candidate_the_line_has_no_candidate_field() -> None:
    r = Running()
    try:
        r.check(check_request(BALANCE, token=make_token()))
        assert "candidate" not in r.log_lines()[-1]
        assert "authz.candidate.outcome" not in r.exporter.get_finished_spans()[-1].attributes
    finally:
        r.stop()


def test_a_broken_candidate_is_rejected_and_counted_and_the_active_policy_is_untouched(tmp_path: Path) -> None:
    r = Running()
    try:
        path = tmp_path / "candidate.yaml"
        path.write_text(example_policy_text(TIGHTER).replace("name: bank-demo", "name: bank-next"))
        watcher = PolicyWatcher(path, r.runtime, 0, candidate=True)
        active = r.runtime.policy
        assert r.call(watcher.reload()) is True
        good = r.runtime.candidate_policy
        assert good is not None and good.name == "bank-next"
        path.write_text(path.read_text().replace("level: critical", "level: nonsense", 1))
        assert r.call(watcher.reload()) is False
        assert "candidate.yaml" in watcher.last_error and "unknown sensitivity level 'nonsense'" in watcher.last_error
        assert r.runtime.candidate_policy is good  # the last good candidate stays
        assert r.runtime.policy is active
        reg = r.metrics.registry
        assert reg.get_sample_value("stepup_candidate_reloads_total", {"result": "rejected"}) == 1
        assert reg.get_sample_value("stepup_candidate_reloads_total", {"result": "applied"}) == 1
        assert (reg.get_sample_value("stepup_policy_reloads_total", {"result": "rejected"}) or 0) == 0
        resp = r.check(check_request(TRANSFER, token=make_token(acr=ACR_PHR)))
        assert resp.status.code == 0
        assert r.log_lines()[-1]["candidate"]["outcome"] == "step_up"
        # Promotion: the candidate's file moves over the policy's; the candidate is then gone.
        path.unlink()
        assert r.call(watcher.reload()) is True
        assert r.runtime.candidate_policy is None
        assert reg.get_sample_value("stepup_candidate_reloads_total", {"result": "removed"}) == 1
        r.check(check_request(TRANSFER, token=make_token(acr=ACR_PHR)))
        assert "candidate" not in r.log_lines()[-1]
    finally:
        r.stop()
