"""`stepup-sidecar test`, `explain`, and the small tools around them (dev-token, validate)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from joserfc import jwt

from tests.helpers import EXAMPLE_POLICY, ROOT, example_policy_text, make_token

EXAMPLE_TESTS = ROOT / "examples" / "policy.test.yaml"


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


FAILING = f"""
policy: {EXAMPLE_POLICY}
cases:
  - name: right
    request: {{grpc: /bank.v1.Accounts/GetBalance, claims: {{sub: alice, roles: [teller], amr: [pwd]}}}}
    expect: {{outcome: allow, reason: allowed}}
  - name: wrong on purpose
    request: {{grpc: /bank.v1.Payments/Transfer, claims: {{sub: alice, roles: [teller], scope: payments}}}}
    expect: {{outcome: allow, acr_values: [phrh], upstream: {{x-auth-subject: bob}}}}
"""


def test_the_example_policy_tests_pass_and_cover_every_rule() -> None:
    proc = cli("test", "--coverage", str(EXAMPLE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-2:] == ["19 passed, 0 failed", "coverage: every rule exercised"]
    assert all(line.startswith("PASS  ") for line in lines[:-2])


def test_a_failing_case_gives_exit_1_and_a_diff_per_difference(tmp_path: Path) -> None:
    suite = write(tmp_path / "t.yaml", FAILING)
    proc = cli("test", str(suite))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"PASS  right  ({suite}: cases[0])",
        f"FAIL  wrong on purpose  ({suite}: cases[1])",
        "      outcome: expected 'allow', got 'step_up'",
        "      acr_values: expected ['phrh'], got ['phr', 'phrh']",
        "      upstream x-auth-subject: expected 'bob', got absent",
        "1 passed, 1 failed",
    ]


def test_junit_output_parses_and_counts_the_failure(tmp_path: Path) -> None:
    suite = write(tmp_path / "t.yaml", FAILING)
    proc = cli("test", "--format", "junit", str(suite))
    assert proc.returncode == 1
    root = ET.fromstring(proc.stdout)
    (ts,) = root.findall("testsuite")
    assert (ts.get("tests"), ts.get("failures")) == ("2", "1")
    cases = {tc.get("name"): tc for tc in ts.findall("testcase")}
    assert cases["right"].find("failure") is None
    failure = cases["wrong on purpose"].find("failure")
    assert failure is not None and failure.get("message") == "outcome: expected 'allow', got 'step_up'"


def test_json_output_and_run_selection(tmp_path: Path) -> None:
    suite = write(tmp_path / "t.yaml", FAILING)
    proc = cli("test", "--format", "json", "--run", "^right$", str(suite))
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert (doc["passed"], doc["failed"]) == (1, 0)
    (case,) = doc["cases"]
    assert case["name"] == "right" and case["got"]["upstream"]["x-auth-subject"] == "alice"


def test_coverage_names_the_rules_no_case_exercised(tmp_path: Path) -> None:
    suite = write(tmp_path / "t.yaml", FAILING)
    proc = cli("test", "--coverage", "--run", "right", str(suite))
    assert proc.stdout.splitlines()[-4:] == [
        "coverage: 8 rule(s) no case exercised",
        "  sensitivity: health, accounts, transfer, admin",
        "  permissions: tellers-transfer, admins, ledger-service",
        "  risk: untrusted-network",
    ]


def test_a_real_token_is_verified_against_the_policys_issuers(tmp_path: Path) -> None:
    now = int(time.time())
    good = make_token(now=now, sub="erin")
    forged = make_token(now=now, sub="erin", key=None)[:-4] + "AAAA"
    suite = write(
        tmp_path / "t.yaml",
        f"""
policy: {EXAMPLE_POLICY}
cases:
  - name: real
    request: {{grpc: /bank.v1.Accounts/GetBalance, token: "{good}"}}
    expect: {{outcome: allow, upstream: {{x-auth-subject: erin}}}}
  - name: forged
    request: {{grpc: /bank.v1.Accounts/GetBalance, token: "{forged}"}}
    expect: {{outcome: unauthenticated, reason: bad_signature, error: invalid_token}}
""",
    )
    proc = cli("test", str(suite))
    assert proc.returncode == 0, proc.stdout


def test_claims_of_any_shape_at_a_time_and_with_an_auth_age(tmp_path: Path) -> None:
    """A Keycloak-shaped token (roles under realm_access.roles), an hours rule at a given time."""
    write(
        tmp_path / "p.yaml",
        example_policy_text(
            ("roles: roles", "roles: realm_access.roles"),
            ("  # - id: off-hours\n  #   when: {outside_hours: {timezone: Europe/Berlin, days: [mon, tue, wed, thu, fri], from: \"07:00\", to: \"20:00\"}}\n  #   raise: 1\n  #   max_age: 15m",
             "  - id: off-hours\n    when: {outside_hours: {timezone: Europe/Berlin, days: [mon, tue, wed, thu, fri], from: \"07:00\", to: \"20:00\"}}\n    raise: 1\n    max_age: 15m"),
        ),
    )
    suite = write(
        tmp_path / "t.yaml",
        """
policy: p.yaml
cases:
  - name: office hours, a password is enough for a balance
    request:
      grpc: /bank.v1.Accounts/GetBalance
      at: 2026-12-02T10:00:00Z          # a Wednesday, 11:00 in Berlin
      claims: {sub: kc-user, realm_access: {roles: [teller]}, acr: "urn:okta:loa:1fa:any"}
      auth_age: 60
    expect: {outcome: allow, reason: allowed}
  - name: at night the same call needs a second factor, recent
    request:
      grpc: /bank.v1.Accounts/GetBalance
      at: 2026-12-02T22:00:00Z          # 23:00 in Berlin
      claims: {sub: kc-user, realm_access: {roles: [teller]}, acr: "urn:okta:loa:1fa:any"}
      auth_age: 20m
    expect: {outcome: step_up, reason: acr_too_low, acr_values: ["urn:okta:loa:2fa:any", phr, phrh], max_age: 900, rules: [off-hours]}
""",
    )
    proc = cli("test", "--coverage", str(suite))
    assert proc.returncode == 0, proc.stdout
    assert "risk: untrusted-network" in proc.stdout and "off-hours" not in proc.stdout.split("coverage:")[1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cases: 3", "a test file is a mapping with a `cases` list"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B}, expect: {outcom: allow}}]", "cases[0].expect"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpcc: /a/B}}]", "unknown key(s) grpcc"),
        ("cases: [{name: x, request: {grpc: /a/B}}]", "no `policy:` in the file and no --policy given"),
        # Found by the red team: each of these was a traceback.
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B, at: .nan}}]", "cases[0].request.at: nan is not a time"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B, at: .inf}}]", "cases[0].request.at: inf is not a time"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B, at: 1e300}}]", "is not a time"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B, claims: {sub: a}, auth_age: -5s}}]", "auth_age: '-5s' is not a duration"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B}, expect: {upstream: [a]}}]",
         "cases[0].expect.upstream: ['a'] is not a mapping"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B}, expect: {rules: 5}}]",
         "cases[0].expect.rules: 5 is not a list of rule ids"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B}, expect: {status: '403'}}]",
         "cases[0].expect.status: '403' is not an integer"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B}, expect: {acr_values: {a: 1}}}]",
         "cases[0].expect.acr_values: {'a': 1} is not a list of strings"),
        ("policy: p.yaml\ncases: [{name: x, request: {grpc: /a/B}, expect: {upstream: {x-a: [1]}}}]",
         "cases[0].expect.upstream.x-a: [1] is not a header value"),
    ],
)
def test_an_unusable_test_file_is_exit_2_with_the_place(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path / "p.yaml", example_policy_text())
    proc = cli("test", str(write(tmp_path / "t.yaml", text)))
    if proc.returncode == 1:  # a request that cannot be built fails its case, naming the place
        assert message in proc.stdout
    else:
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_test_file_that_is_not_utf8_is_exit_2(tmp_path: Path) -> None:
    suite = tmp_path / "t.yaml"
    suite.write_bytes(b"cases: []\nname: \xff\xfe\n")
    proc = cli("test", "--policy", str(EXAMPLE_POLICY), str(suite))
    assert proc.returncode == 2 and "t.yaml: not UTF-8 text (byte 16)" in proc.stderr, proc.stderr
    proc = cli("explain", "--policy", str(EXAMPLE_POLICY), "--request", str(suite))
    assert proc.returncode == 2 and "t.yaml: not UTF-8 text (byte 16)" in proc.stderr, proc.stderr


def test_junit_stays_well_formed_with_control_characters_in_a_name(tmp_path: Path) -> None:
    suite = write(
        tmp_path / "t.yaml",
        f"policy: {EXAMPLE_POLICY}\ncases:\n"
        '  - name: "bell\\a and escape\\e"\n'
        "    request: {grpc: /bank.v1.Accounts/GetBalance}\n"
        "    expect: {outcome: allow}\n",
    )
    proc = cli("test", "--format", "junit", str(suite))
    assert proc.returncode == 1, proc.stderr
    case = ET.fromstring(proc.stdout).find("./testsuite/testcase")
    assert case is not None and case.get("name") == "bell\\x07 and escape\\x1b"
    assert case.find("failure") is not None


# --- explain ---------------------------------------------------------------------------------------


def explain(*args: str) -> dict[str, Any]:
    proc = cli("explain", "--policy", str(EXAMPLE_POLICY), "--format", "json", *args)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_explain_takes_epoch_seconds_and_plain_seconds_of_auth_age() -> None:
    w = explain(
        "--http", "POST /v1/transfers", "--claim", "sub=alice", "--claim", 'roles=["teller"]',
        "--claim", "scope=payments", "--claim", "acr=phrh", "--at", "1796212800", "--auth-age", "90",
    )
    assert w["identity"]["auth_age_seconds"] == 90
    assert w["answer"]["outcome"] == "allow", w["answer"]
    proc = cli("explain", "--policy", str(EXAMPLE_POLICY), "--grpc", "/a/B", "--at", "nan")
    assert proc.returncode == 2 and "request.at: 'nan' is not a time" in proc.stderr, proc.stderr


def test_explain_a_permission_denial_names_the_missing_kinds() -> None:
    w = explain("--grpc", "/bank.v1.Payments/Transfer", "--claim", "sub=carol", "--claim", 'roles=["customer"]', "--claim", "acr=phr")
    assert w["answer"]["reason"] == "permission_denied"
    assert w["operation"]["candidates"] == [{"rule": "transfer", "level": "high", "won": True, "path": "/bank.v1.Payments/Transfer"}]
    assert w["permissions"] == [{"rule": "tellers-transfer", "granted": False, "missing": ["roles", "scopes"]}]
    assert w["identity"]["roles"] == ["customer"] and w["identity"]["level"] == "aal2_phr"
    assert w["identity"]["level_source"] == "acr"


def test_explain_a_step_up_shows_the_requirement_the_risk_and_the_challenge() -> None:
    w = explain(
        "--http", "POST /v1/transfers", "--claim", "sub=alice", "--claim", 'roles=["teller"]',
        "--claim", "scope=payments", "--claim", "acr=urn:okta:loa:1fa:any", "--auth-age", "2h",
        "--source", "203.0.113.9",
    )
    assert (w["answer"]["outcome"], w["answer"]["reason"]) == ("step_up", "acr_too_low")
    assert w["requirement"] == {"min_assurance": "aal3", "max_age_seconds": 1800, "required_amr": [], "risk_rules": ["untrusted-network"]}
    assert w["risk"] == [{"rule": "untrusted-network", "fired": True, "raise_by": 1, "max_age_seconds": 1800}]
    assert w["permissions"] == [{"rule": "tellers-transfer", "granted": True, "missing": []}]
    assert w["answer"]["headers"]["www-authenticate"].endswith('acr_values="phrh", max_age=1800')


def test_explain_an_allow_shows_the_upstream_headers_and_the_beaten_rules(tmp_path: Path) -> None:
    request = write(tmp_path / "r.yaml", "request:\n  http: GET /v1/accounts/7/balance\n  claims: {sub: alice, roles: [teller], amr: [pwd]}\n")
    w = explain("--request", str(request))
    assert w["answer"]["outcome"] == "allow"
    assert [(c["rule"], c["won"]) for c in w["operation"]["candidates"]] == [("balance", True), ("accounts", False)]
    assert w["answer"]["headers"]["x-auth-subject"] == "alice"
    assert w["identity"]["level_source"] == "amr"
    text = cli("explain", "--policy", str(EXAMPLE_POLICY), "--request", str(request)).stdout
    assert "-> balance (level low)" in text and "accounts (level personal), beaten" in text
    assert "tellers-read: grants" in text and "x-auth-subject: alice" in text


# --- dev-token and validate -------------------------------------------------------------------------


def test_dev_token_sets_nested_claims_from_paths_and_a_file(tmp_path: Path) -> None:
    extra = write(tmp_path / "c.json", json.dumps({"acrs": ["c1"], "tid": "t-1"}))
    proc = cli(
        "dev-token", "--claim", 'realm_access.roles=["teller","auditor"]', "--claim", "sid=abc",
        "--claim", "n=3", "--claims-file", str(extra),
    )
    assert proc.returncode == 0, proc.stderr
    claims = jwt.decode(proc.stdout.strip(), _public_key()).claims
    assert claims["realm_access"] == {"roles": ["teller", "auditor"]}
    assert (claims["sid"], claims["n"], claims["acrs"], claims["tid"]) == ("abc", 3, ["c1"], "t-1")
    assert "--claim PATH=VALUE" in cli("dev-token", "--help").stdout
    assert "(default: alice)" in cli("dev-token", "--help").stdout


def _public_key() -> Any:
    from joserfc.jwk import KeySet

    return KeySet.import_key_set(json.loads((ROOT / "examples/keys/dev-jwks.json").read_text()))


def test_validate_offline_and_json(tmp_path: Path) -> None:
    policy = write(tmp_path / "p.yaml", example_policy_text(("jwks_file: " + str(EXAMPLE_POLICY.parent) + "/keys/dev-jwks.json", "jwks_uri: https://idp.invalid/jwks")))
    proc = cli("validate", "--offline", str(policy))
    assert proc.returncode == 0 and "offline, jwks_uri keys are not fetched" in proc.stderr
    assert f"{policy}: ok (bank-demo@" in proc.stdout
    bad = write(tmp_path / "bad.yaml", example_policy_text(("level: low}", "level: lowx}")))
    proc = cli("validate", "--offline", "--format", "json", str(policy), str(bad))
    assert proc.returncode == 1
    ok, broken = json.loads(proc.stdout)
    assert ok["ok"] is True and ok["version"].startswith("bank-demo@")
    assert broken["ok"] is False
    assert broken["problems"][0]["where"] == "sensitivity.rules[1].level"
    assert "unknown sensitivity level 'lowx'" in broken["problems"][0]["message"]


@pytest.mark.parametrize("command", ["serve", "validate", "schema", "test", "explain", "dev-token"])
def test_every_subcommand_describes_itself(command: str) -> None:
    out = cli(command, "--help").stdout
    assert out.startswith("usage: stepup-sidecar " + command)
    assert len(out.splitlines()) > 3
