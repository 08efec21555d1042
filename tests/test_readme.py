"""The README promises what the repository does: its examples are the real files and flags."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from sidecar.cli import _parser
from tests.helpers import EXAMPLE_POLICY, ROOT

README = (ROOT / "README.md").read_text()


def _block_after(marker: str, lang: str = "yaml") -> str:
    start = README.index(marker)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert m is not None
    return m.group(1)


def test_the_two_commands_are_shown() -> None:
    assert "make run" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_policy_example_is_the_file_make_run_serves() -> None:
    assert (
        _block_after("The complete example that `make run` serves").strip()
        == EXAMPLE_POLICY.read_text().strip()
    )


def test_the_envoy_snippet_matches_the_example_config() -> None:
    snippet = yaml.safe_load(_block_after("## Point Envoy at it"))
    example = yaml.safe_load((ROOT / "examples" / "envoy" / "envoy.yaml").read_text())
    hcm = example["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    real = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    for f in snippet["http_filters"]:
        cfg = real[f["name"]]
        for key, value in f["typed_config"].items():
            assert cfg[key] == value, (f["name"], key)
    clusters = {c["name"]: c for c in example["static_resources"]["clusters"]}
    for c in snippet["clusters"]:
        assert (
            c["typed_extension_protocol_options"] == clusters[c["name"]]["typed_extension_protocol_options"]
        )


def test_every_serve_flag_and_env_var_is_documented() -> None:
    serve = next(a for a in _parser()._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]  # type: ignore[union-attr]
    for action in serve._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt not in ("--help", "--no-explain"):
                assert f"`{opt}" in README, opt
        m = re.search(r"\[(STEPUP_[A-Z_]+)\]", action.help or "")
        if m:
            assert f"`{m.group(1)}`" in README, m.group(1)


def _table() -> str:
    return README[README.index("## What the sidecar answers") : README.index("A step-up answer carries")]


def test_the_decision_table_documents_exactly_the_registered_reasons() -> None:
    """Both directions: every reason the sidecar can answer with is in the README's table, with
    its outcome and HTTP status, and every code the table names is registered."""
    from sidecar.reasons import REASONS

    rows = [line for line in _table().splitlines() if re.match(r"\| (\d|\u2013) \|", line)]
    documented: dict[str, tuple[str, int]] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        outcome, status = cells[2].strip("*"), int(cells[3])
        for code in re.findall(r"`([a-z]+(?:_[a-z]+)*)`", cells[-1]):
            documented[code] = (outcome, status)
    assert set(documented) == set(REASONS)
    for code, r in REASONS.items():
        assert documented[code] == (r.outcome.value.replace("_", " "), r.http_status), code


def test_every_decision_is_built_from_a_registered_reason() -> None:
    """No reason code is spelled outside sidecar/reasons.py: Decisions are made in exactly three
    places, each from a Reason, and every AuthError names a registered one."""
    decisions = []
    for path in (ROOT / "sidecar").glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bDecision\(", line) and "class Decision" not in line:
                decisions.append(f"{path.name}:{line.strip()}")
            if "AuthError(" in line and "class AuthError" not in line and "except" not in line:
                assert "AuthError(R." in line, f"{path.name}:{n}: {line.strip()}"
    assert sorted(decisions) == [
        "engine.py:return Decision(",
        "engine.py:return Decision(",
        "runtime.py:return Decision(r.outcome, r.code, r.http_status, r.description, error=r.error)",
    ]


def test_the_complete_test_file_example_runs_and_passes(tmp_path: Path) -> None:
    """The README's complete test file is a real one: it runs against the example policy."""
    suite = tmp_path / "t.yaml"
    suite.write_text(_block_after("A test file, complete:"))
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "test", "--policy", str(EXAMPLE_POLICY), str(suite)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "1 passed, 0 failed"


def test_the_explain_session_is_what_explain_prints() -> None:
    block = _block_after("## Why this answer? `stepup-sidecar explain`", "console")
    command, _, expected = block.partition("\n")
    while command.endswith("\\"):
        more, _, expected = expected.partition("\n")
        command = command[:-1] + more.strip()
    args = shlex.split(command.removeprefix("$ "))
    assert args[0] == "stepup-sidecar"
    proc = subprocess.run([sys.executable, "-m", "sidecar", *args[1:]], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected.strip()
