"""The Dockerfile lints clean and builds from what it copies (checked without a container engine).

hadolint (from this venv) lints it; the build context it copies is assembled by hand, honouring
.dockerignore, and the builder stage's wheel is built from exactly those files. A missing tool
fails the test, it never skips it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.prefix) / "bin"
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    stage: int
    op: str
    args: str


def instructions() -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined, comments dropped, and the index
    of the build stage (FROM) each one belongs to (-1 before the first FROM)."""
    out: list[Instruction] = []
    stage, pending = -1, ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        op, _, args = line.partition(" ")
        if op.upper() == "FROM":
            stage += 1
        out.append(Instruction(stage, op.upper(), " ".join(args.split())))
    assert not pending
    return out


def final_stage() -> list[Instruction]:
    ins = instructions()
    last = max(i.stage for i in ins)
    return [i for i in ins if i.stage == last]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in stage:
        if i.op == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(i.args))
    return env


def copies() -> list[list[str]]:
    """Source paths of each COPY from the build context (not `COPY --from=stage`)."""
    out = []
    for i in instructions():
        if i.op in ("COPY", "ADD") and "--from=" not in i.args:
            words = [w for w in i.args.split() if not w.startswith("--")]
            out.append(words[:-1])
    return out


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _match(pattern: str, path: str) -> bool:
    """Go's filepath.Match per path segment (`*` never crosses `/`), plus `**` for any depth."""
    pat, parts = pattern.split("/"), path.split("/")
    if pat[0] == "**":
        rest = "/".join(pat[1:])
        return any(_match(rest, "/".join(parts[i:])) for i in range(len(parts)))
    if len(pat) != len(parts):
        return False
    return all(fnmatch.fnmatchcase(part, p) for part, p in zip(parts, pat, strict=True))


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is excluded when it or a parent directory matches the last matching
    pattern; `!pattern` re-includes."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").strip("/")
        if any(_match(pat, c) for c in candidates):
            result = not negate
    return result


def context_files() -> list[Path]:
    """Every file of the build context that the Dockerfile copies."""
    patterns = dockerignore()
    files = []
    for sources in copies():
        for src in sources:
            path = ROOT / src
            found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            files += [f for f in found if not ignored(str(f.relative_to(ROOT)), patterns)]
    return files


def test_hadolint_passes() -> None:
    """hadolint reports nothing, not even style or info findings."""
    hadolint = BIN / "hadolint"
    assert hadolint.is_file(), f"hadolint missing from {BIN}: pip install -e '.[test]'"
    out = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", DOCKERFILE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "XDG_CONFIG_HOME": "/nonexistent", "HOME": "/nonexistent"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ""


def test_every_copied_path_exists_and_is_not_dockerignored() -> None:
    """Each COPY source is in the repository and survives .dockerignore."""
    patterns = dockerignore()
    sources = [s for group in copies() for s in group]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src.rstrip("/"), patterns), src


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    """The venv, git metadata, caches and the development private key never enter the context."""
    patterns = dockerignore()
    for rel in [
        ".venv/bin/python",
        ".git/config",
        ".pytest_cache/v",
        ".mypy_cache/x",
        ".ruff_cache/x",
        "sidecar/__pycache__/cli.cpython-311.pyc",
        "stepup_sidecar.egg-info/PKG-INFO",
        "examples/keys/dev-private-jwk.json",
        "tests/test_k8s.py",
    ]:
        assert ignored(rel, patterns), rel
    assert not ignored("sidecar/cli.py", patterns)
    assert not ignored("sidecar/_proto/stepup/v1/explain_pb2.py", patterns)


def test_builder_stage_builds_a_wheel_from_exactly_the_copied_files(tmp_path: Path) -> None:
    """The copied files alone build a wheel with the package data and the `stepup-sidecar` script
    the ENTRYPOINT runs."""
    context = tmp_path / "context"
    for f in context_files():
        dest = context / f.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path / "dist",
            context,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("stepup_sidecar-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {
        "sidecar/cli.py",
        "sidecar/server.py",
        "sidecar/policy.schema.json",
        "sidecar/_proto/stepup/v1/explain_pb2.py",
    } <= names
    assert "stepup-sidecar = sidecar.cli:main" in entry_points


def test_stages_use_one_slim_python_311_base() -> None:
    """Both stages start from the same slim Python 3.11 image, named by an ARG."""
    ins = instructions()
    arg = next(i for i in ins if i.op == "ARG" and i.stage == -1)
    name, _, image = arg.args.partition("=")
    assert image.startswith("python:3.11-slim")
    froms = [i.args.split()[0] for i in ins if i.op == "FROM"]
    assert froms == [f"${{{name}}}", f"${{{name}}}"]


def test_final_stage_has_only_the_venv_and_no_build_tools() -> None:
    """The final stage runs nothing (so installs nothing) and copies only the builder's venv."""
    final = final_stage()
    assert not [i for i in final if i.op in ("RUN", "ADD")]
    final_copies = [i.args for i in final if i.op == "COPY"]
    assert final_copies == ["--from=builder /opt/venv /opt/venv"]
    builder_from = next(i for i in instructions() if i.op == "FROM")
    assert builder_from.args.endswith(" AS builder")


def test_final_stage_runs_the_sidecar_as_a_numeric_non_root_user() -> None:
    """USER is numeric and not root; ENTRYPOINT is `stepup-sidecar serve` in exec form."""
    final = final_stage()
    (user,) = [i.args for i in final if i.op == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    (entrypoint,) = [i.args for i in final if i.op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["stepup-sidecar", "serve"]
    assert env_of(final)["PATH"].startswith("/opt/venv/bin:")


def test_final_stage_defaults_are_safe() -> None:
    """The image listens on loopback on the EXPOSEd port, reads the mounted policy, has Explain off."""
    final = final_stage()
    env = env_of(final)
    host, _, port = env["STEPUP_LISTEN"].rpartition(":")
    assert host == "127.0.0.1"
    assert [i.args for i in final if i.op == "EXPOSE"] == [port]
    assert env["STEPUP_POLICY"] == "/etc/stepup/policy.yaml"
    assert env["STEPUP_EXPLAIN"] == "false"
