"""Policy validation: every problem is reported with file, line, column and location."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from sidecar.compiler import PolicyError, load_policy_text
from sidecar.policyfile import schema
from tests.helpers import EXAMPLE_POLICY, example_policy_text

KEYS = EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json"

BASE = f"""\
version: 1
realm: test
assurance:
  levels: [aal1, aal2]
issuers:
  - id: dev
    issuer: https://idp.example.test
    audiences: [api]
    jwks_file: {KEYS}
    acr:
      aal1: {{accept: [one]}}
      aal2: {{accept: [two]}}
sensitivity:
  levels:
    low: {{min_assurance: aal1}}
    high: {{min_assurance: aal2, max_age: 1h}}
  rules:
    - {{id: a, match: ["/svc.A/*"], level: low}}
    - {{id: b, match: ["/svc.A/Write"], level: high}}
permissions:
  - id: p
    match: ["/svc.A/*"]
    allow: {{roles: [user]}}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, file="p.yaml")
    return [str(p) for p in e.value.problems]


def test_base_policy_is_valid() -> None:
    p = load_policy_text(BASE, file="p.yaml")
    assert p.levels == ("aal1", "aal2") and p.version.startswith("policy@")


def test_example_policy_validates_against_the_published_schema() -> None:
    jsonschema.validate(yaml.safe_load(EXAMPLE_POLICY.read_text()), schema())


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "    allow: {roles: [user]}",
            "    allow: {rolez: [user]}",
            "p.yaml:23:12: permissions[0].allow: unknown key(s) ('rolez' was unexpected)",
        ),
        (
            "max_age: 1h",
            "max_age: 1 hour",
            "p.yaml:16:42: sensitivity.levels.high.max_age: '1 hour' is not a duration",
        ),
        (
            "level: high}",
            "level: highest}",
            "p.yaml:19:47: sensitivity.rules[1].level: unknown sensitivity level",
        ),
        (
            'match: ["/svc.A/Write"]',
            'match: ["/svc.A/*"]',
            "p.yaml:19:23: sensitivity.rules[1].match[0]: pattern '/svc.A/*' is also claimed by rule 'a': ties",
        ),
        (
            'match: ["/svc.A/Write"]',
            'match: ["/svc.A/../Write"]',
            "sensitivity.rules[1].match[0]: pattern '/svc.A/../Write': path is not in canonical form",
        ),
        (
            'match: ["/svc.A/Write"]',
            'match: ["/svc.A/W*"]',
            "sensitivity.rules[1].match[0]: pattern '/svc.A/W*': '*' must be a whole segment",
        ),
        ('match: ["/svc.A/Write"]', 'match: ["/**/Write"]', "'**' may only be the last segment"),
        (
            "min_assurance: aal2,",
            "min_assurance: aal5,",
            "p.yaml:16:27: sensitivity.levels.high.min_assurance: unknown assurance level 'aal5'",
        ),
        (
            "      aal2: {accept: [two]}\n",
            "",
            "p.yaml:11:7: issuers[0].acr: sensitivity level 'high' can require 'aal2', but issuer 'dev' has no acr",
        ),
        (
            "      aal2: {accept: [two]}",
            "      aal2: {accept: [one]}",
            "issuers[0].acr.aal2.accept: acr 'one' already proves level 'aal1'",
        ),
        (
            f"jwks_file: {KEYS}",
            "jwks_file: /nonexistent/jwks.json",
            "p.yaml:9:16: issuers[0].jwks_file: cannot read JWKS file '/nonexistent/jwks.json'",
        ),
        (
            "    audiences: [api]\n",
            "",
            "issuers[0]: an issuer whose tokens the sidecar verifies needs 'audiences'",
        ),
        (
            f"jwks_file: {KEYS}",
            "jwks_uri: http://idp.example.test/jwks",
            "issuers[0].jwks_uri: a JWKS URL must use https",
        ),
        ("version: 1", "version: 2", "p.yaml:1:10: version: 1 was expected"),
        # Integer-valued floats: JSON Schema calls them integers, the compiler crashed on them.
        (
            "max_age: 1h",
            "max_age: 3600.0",
            "p.yaml:16:42: sensitivity.levels.high.max_age: 3600.0 is not a duration",
        ),
        ("  levels: [aal1, aal2]\n", "  levels: [aal1, aal2]\n  clock_skew: 60.0\n", "assurance.clock_skew: 60.0 is"),
        (
            "permissions:",
            "risk:\n  - {id: r, when: {source_not_in: [10.0.0.0/8]}, raise: 1.0}\n"
            "permissions:",
            "raise: 1.0 is not of type 'integer'",
        ),
        ("realm: test", "realm: 'te\"st'", "realm: 'te\"st' does not have the expected form"),
    ],
)
def test_problem_is_reported_where_it_is(old: str, new: str, expected: str) -> None:
    assert old in BASE
    found = problems(BASE.replace(old, new))
    assert any(expected in p for p in found), found


def test_every_problem_is_collected_not_just_the_first() -> None:
    text = BASE.replace("max_age: 1h", "max_age: soon").replace(
        "rules:\n", "rules:\n    - {id: a, match: [x], level: low}\n"
    )
    found = problems(text.replace("allow: {roles: [user]}", "allow: {}"))
    assert len(found) >= 3, found


def test_duplicate_yaml_keys_are_refused() -> None:
    found = problems(BASE.replace("realm: test", "realm: test\nrealm: other"))
    assert found == ["p.yaml:3:1: realm: duplicate key"]


def test_yaml_syntax_error_names_the_line() -> None:
    found = problems(BASE + "permissions: [\n")
    assert found[0].startswith("p.yaml:") and "invalid YAML" in found[0]


def test_risk_rule_that_raises_beyond_the_acr_table_is_refused() -> None:
    text = (
        BASE.replace("      aal2: {accept: [two]}\n", "      aal2: {accept: [two]}\n").replace(
            "levels: [aal1, aal2]", "levels: [aal1, aal2, aal3]"
        )
        + "risk:\n  - {id: net, when: {source_not_in: [10.0.0.0/8]}, raise: 1}\n"
    )
    found = problems(text)
    assert any("raised by risk rule 'net' can require 'aal3'" in p for p in found), found


def test_bad_cidr_and_time_zone_are_reported() -> None:
    text = BASE + (
        "risk:\n"
        "  - {id: net, when: {source_not_in: [10.0.0.1/8]}, raise: 0}\n"
        "  - {id: hours, when: {outside_hours: {timezone: Mars/Olympus, from: '07:00', to: '19:00'}}, raise: 0}\n"
    )
    found = problems(text)
    assert any("risk[0].when.source_not_in[0]: not a network" in p for p in found), found
    assert any("risk[1].when.outside_hours.timezone: unknown time zone 'Mars/Olympus'" in p for p in found)


def test_principal_pattern_allows_only_a_trailing_star() -> None:
    found = problems(BASE.replace("allow: {roles: [user]}", "allow: {principals: ['spiffe://*/ns/x']}"))
    assert any("'*' is only allowed at the end of a principal" in p for p in found)


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "sidecar", "validate", str(EXAMPLE_POLICY)], capture_output=True, text=True
    )
    assert good.returncode == 0 and "ok (bank-demo@" in good.stdout
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(BASE.replace("max_age: 1h", "max_age: soon"))
    bad = subprocess.run(
        [sys.executable, "-m", "sidecar", "validate", str(bad_file)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert f"{bad_file}:16:42: sensitivity.levels.high.max_age:" in bad.stderr


def test_schema_command_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "schema"], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)["title"].startswith("stepup-sidecar policy")


def test_case_insensitive_paths_refuse_rules_that_differ_only_in_case(tmp_path: Path) -> None:
    text = example_policy_text(
        ("version: 1\n", "version: 1\npaths: {case_sensitive: false}\n"),
        ('{id: health, match: ["GET /healthz"], level: public}',
         '{id: health, match: ["GET /healthz"], level: public}\n    - {id: health2, match: ["GET /HealthZ"], level: low}'),
    )
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, file="p.yaml")
    assert "also claimed by rule 'health'" in str(e.value)


def test_a_principal_prefix_that_does_not_end_at_a_slash_is_warned_about() -> None:
    """`spiffe://cluster.local/ns/bank*` also grants `ns/bank-untrusted/...`."""
    text = example_policy_text(
        ('allow: {principals: ["spiffe://cluster.local/ns/bank/sa/ledger"]}',
         'allow: {principals: ["spiffe://cluster.local/ns/bank*"]}'),
    )
    policy = load_policy_text(text, file="p.yaml")
    assert any("does not end at a '/'" in w and "ledger-service" in w for w in policy.warnings)
    ok = example_policy_text(
        ('allow: {principals: ["spiffe://cluster.local/ns/bank/sa/ledger"]}',
         'allow: {principals: ["spiffe://cluster.local/ns/bank/*"]}'),
    )
    assert not any("does not end" in w for w in load_policy_text(ok, file="p.yaml").warnings)


# --- JSON policies and the fast rule check ----------------------------------------------------------

import json as _json  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sidecar import policyfile as _pf  # noqa: E402
from sidecar.compiler import load_policy as _load_policy  # noqa: E402


def test_a_json_policy_loads_like_the_same_yaml(tmp_path: Path) -> None:
    doc = yaml.safe_load(example_policy_text())
    (tmp_path / "p.json").write_text(_json.dumps(doc))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    j, y = _load_policy(tmp_path / "p.json"), _load_policy(tmp_path / "p.yaml")
    assert j.rule_ids == y.rule_ids and j.levels == y.levels
    rule = j.tables.sensitivity("POST", "/bank.v1.Payments/Transfer")
    assert rule is not None and rule.level == "high"


def test_a_broken_json_policy_names_the_place(tmp_path: Path) -> None:
    doc = yaml.safe_load(example_policy_text())
    doc["permissions"][1]["allow"]["roles"] = []
    doc["sensitivity"]["rules"][2]["level"] = 7
    path = tmp_path / "p.json"
    path.write_text(_json.dumps(doc, indent=2))
    with pytest.raises(PolicyError) as e:
        _load_policy(path)
    text = str(e.value)
    assert "permissions[1].allow.roles" in text and "sensitivity.rules[2].level" in text
    assert f"{path}:1:1" not in text  # located by line, not just by path
    (tmp_path / "bad.json").write_text('{"version": 1,')
    with pytest.raises(PolicyError) as e2:
        _load_policy(tmp_path / "bad.json")
    assert "invalid JSON" in str(e2.value)


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2), st.text(max_size=6),
    st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3),
)
_rules = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.sampled_from(["a", "r-1", "x:y", "", "-a", "a b"]), _values),
        "match": st.one_of(st.lists(st.sampled_from(["/a", "GET /b/*", "get /c", "/d?x", "x", "* /e/**"]), max_size=3), _values),
        "level": st.one_of(st.sampled_from(["low", "High", "1x", ""]), _values),
        "allow": st.one_of(
            st.dictionaries(
                st.sampled_from(["anyone", "authenticated", "roles", "users", "principals", "bogus"]),
                st.one_of(st.just(True), st.lists(st.sampled_from(["a", "b", ""]), max_size=3), _values),
                max_size=3,
            ),
            _values,
        ),
        "extra": _values,
    },
)


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(r=_rules)
def test_the_fast_rule_check_never_accepts_what_the_schema_refuses(r: dict[str, object]) -> None:
    if _pf._sensitivity_rule_ok(r):
        assert not list(_pf._SENS_RULE.iter_errors(r)), r
    if _pf._permission_rule_ok(r):
        assert not list(_pf._PERM_RULE.iter_errors(r)), r


@pytest.mark.parametrize("key", ["1", "yes", "~", "1.5", "2026-01-01", "0x1F"])
@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("      aal3: {accept: [phrh]}\n", "      aal3: {accept: [phrh], implies_amr: {KEY: [hwk]}}\n"),
        ("    aal1: a password login\n", "    aal1: a password login\n    KEY: a login\n"),
    ],
    ids=["implies_amr", "describe"],
)
def test_a_key_that_is_not_text_is_refused_with_its_place(tmp_path: Path, key: str, old: str, new: str) -> None:
    """YAML reads `1:` as the number 1, `yes:` as true: the schema's key patterns do not see them,
    and JSON (the start-up validator's hand-over) would turn them into text. Refused everywhere,
    small file or large (helper-19 F3: past 1 MiB `implies_amr: {1: [hwk]}` was served)."""
    from sidecar import app
    from sidecar.compiler import load_policy
    from sidecar.isolated import load_isolated

    text = example_policy_text()
    assert old in text
    text = text.replace(old, new.replace("KEY", key), 1)
    line = text[: text.index(new.replace("KEY", key))].count("\n") + 1 + (new.count("\n") - 1)
    path = tmp_path / "policy.yaml"
    (tmp_path / "keys").symlink_to(EXAMPLE_POLICY.parent / "keys")
    path.write_text(text)
    with pytest.raises(PolicyError) as local:
        load_policy(path)
    [problem] = [p for p in local.value.problems if p.message.endswith("is not text: quote it")]
    # At the key; a key whose value reads other than its text (yes: True) at its mapping.
    assert problem.line == line if key in ("1", "1.5", "2026-01-01") else problem.line in (line, line - 1)
    path.write_text(text + "#" + "x" * app.LARGE_YAML + "\n")  # large: serve's start-up validator
    with pytest.raises(PolicyError) as isolated:
        load_isolated(path, compile_in_child=False)
    assert "is not text: quote it" in str(isolated.value)
    assert str(isolated.value) == str(local.value)
