"""Hostile input to the offline tools (`test`, `explain`, `validate`, `dev-token`): every one gets
exit 2 (or a failed case) with the file, the place and the problem, never a traceback.

Found by fuzzing the tools after the hardening issue: YAML that resolves a scalar as a type it
cannot construct (`2026-02-30`), nesting deeper than Python's stack, text UTF-8 cannot carry (a
lone surrogate escape), integers beyond a double in jwt_authn metadata, non-ASCII digits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import main
from sidecar.policyfile import PolicyError, parse_text
from tests.helpers import EXAMPLE_POLICY, ROOT, example_policy_text

BALANCE = "GET /v1/accounts/7/balance"
DEEP_100 = "[" * 100 + "]" * 100


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def suite(tmp_path: Path, cases: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(f"policy: {EXAMPLE_POLICY}\ncases:\n{cases}", encoding="utf-8")
    return path


# --- test files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "place"),
    [
        ('- name: d\n  request: {http: "GET /healthz", at: 2026-02-30}\n  expect: {outcome: allow}\n',
         "t.yaml:4:39: cases[0].request.at: '2026-02-30' is not a date or time (day is out of range for month)"),
        ('- name: d\n  request: {http: "GET /healthz"}\n  expect: {outcome: 2026-13-01}\n',
         "t.yaml:5:21: cases[0].expect.outcome: '2026-13-01' is not a date or time (month must be in 1..12)"),
        ("- name: d\n  request: {http: \"GET /healthz\", claims: {n: !!int x}}\n",
         "t.yaml:4:47: cases[0].request.claims.n: 'x' is not an integer"),
    ],
)  # fmt: skip
def test_a_scalar_yaml_cannot_construct_is_exit_2_at_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, place: str
) -> None:
    code, _, err = run(capsys, "test", str(suite(tmp_path, case)))
    assert code == 2
    assert err.strip() == f"stepup-sidecar test: {tmp_path}/{place}"


@pytest.mark.parametrize("where", ["request.claims", "expect.upstream", "request.raw.attributes"])
def test_a_test_file_nested_thousands_deep_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    deep = "[" * 3000 + "]" * 3000
    section, _, key = where.partition(".")
    if section == "request":
        request = '{http: "GET /healthz", claims: {x: ' + deep + "}}" if key == "claims" else "{raw: {x: " + deep + "}}"
        case = f"- name: d\n  request: {request}\n  expect: {{outcome: allow}}\n"
    else:
        case = '- name: d\n  request: {http: "GET /healthz"}\n' f"  expect: {{upstream: {{x: {deep}}}}}\n"
    code, _, err = run(capsys, "test", str(suite(tmp_path, case)))
    assert code == 2
    assert err.startswith(f"stepup-sidecar test: {tmp_path}/t.yaml:4:") or err.startswith(
        f"stepup-sidecar test: {tmp_path}/t.yaml:5:"
    )
    assert err.rstrip().endswith("invalid YAML: exceeded maximum nesting depth")


@pytest.mark.parametrize(
    ("request_yaml", "message"),
    [
        # Nested deeper than jwt_authn metadata (a protobuf Struct) or the JSON encoder can go.
        (f'{{http: "{BALANCE}", claims: {{sub: a, x: {DEEP_100}}}}}',
         "cases[0].request.claims.x: nested more than 64 levels deep"),
        (f'{{http: "{BALANCE}", via: jwt_authn, claims: {{sub: a, x: {{y: {DEEP_100}}}}}}}',
         "cases[0].request.claims.x: nested more than 30 levels deep (jwt_authn metadata"),
        # A double holds no integer of 400 digits; a bearer token's JSON does (next test).
        (f'{{http: "{BALANCE}", via: jwt_authn, claims: {{sub: a, n: {"9" * 400}}}}}',
         "cases[0].request.claims.n: an integer of 400 digits, beyond what jwt_authn metadata"),
        ("{raw: {attributes: {metadataContext: {filterMetadata: {x: {n: " + "9" * 400 + "}}}}}}",
         "cases[0].request.raw: not a CheckRequest:"),
        # "²".isdigit() is True, int("²") raises.
        (f'{{http: "{BALANCE}", claims: {{sub: a}}, auth_age: "²"}}',
         "cases[0].request.auth_age: '²' is not a duration"),
        (f'{{http: "{BALANCE}", claims: {{sub: a}}, auth_age: "1e999"}}',
         "cases[0].request.auth_age: '1e999' is not a duration"),
    ],
)  # fmt: skip
def test_a_request_that_cannot_be_built_fails_its_case_with_the_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request_yaml: str, message: str
) -> None:
    path = suite(tmp_path, f"- name: hostile\n  request: {request_yaml}\n  expect: {{outcome: allow}}\n")
    code, out, _ = run(capsys, "test", str(path))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"FAIL  hostile  ({path}: cases[0])"
    assert lines[1].startswith(f"      the request cannot be built: {message}"), lines[1]
    assert lines[-1] == "0 passed, 1 failed"


def test_a_bearer_token_carries_what_metadata_cannot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same huge integer as a bearer token's claim is decided (its JSON holds it)."""
    path = suite(
        tmp_path,
        f'- name: big\n  request: {{http: "{BALANCE}", claims: {{sub: a, roles: [teller], amr: [pwd],'
        f' n: {"9" * 400}}}}}\n  expect: {{outcome: allow, reason: allowed}}\n',
    )
    code, out, _ = run(capsys, "test", str(path))
    assert (code, out.splitlines()[-1]) == (0, "1 passed, 0 failed"), out


def test_a_lone_surrogate_escape_in_a_test_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """libyaml refuses "\udc80" (the pure-Python reader took it; printing the case name or
    encoding the path then raised)."""
    for case, line in (
        ('- name: "bad \\udc80 name"\n  request: {http: "GET /healthz"}\n', 3),
        ('- name: d\n  request: {http: "GET /v1/\\udc80"}\n', 4),
    ):
        code, _, err = run(capsys, "test", str(suite(tmp_path, case)))
        assert code == 2
        assert err.startswith(f"stepup-sidecar test: {tmp_path}/t.yaml:{line}:"), err
        assert err.rstrip().endswith("invalid YAML: found invalid Unicode character escape code")


def test_a_command_line_argument_utf8_cannot_carry_is_refused_with_its_place(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A byte that is not UTF-8 on the command line arrives as a lone surrogate (surrogateescape)."""
    for argv, message in [
        (["--http", "GET /v1/\udc80"],
         "request.http: 'GET /v1/\\udc80' is not text UTF-8 can carry (a lone surrogate, U+DC80, at character 8)"),
        (["--http", "GET /healthz", "--header", "x-\udcff=a"], "request.headers: 'x-\\udcff' is not text UTF-8 can carry"),
        (["--http", "GET /healthz", "--header", "x-a=\udcff"], "request.headers.x-a: '\\udcff' is not text UTF-8 can carry"),
        (["--http", "GET /healthz", "--principal", "\udc80"], "request.principal: '\\udc80' is not text UTF-8 can carry"),
        (["--grpc", "/a.B/\udc80"], "request.grpc: '/a.B/\\udc80' is not text UTF-8 can carry"),
    ]:  # fmt: skip
        code, _, err = run(capsys, "explain", "--policy", str(EXAMPLE_POLICY), *argv)
        assert code == 2
        assert err.startswith(f"stepup-sidecar explain: {message}"), err


def test_a_real_pipe_takes_every_report_of_a_suite_with_odd_text(tmp_path: Path) -> None:
    """stdout a real pipe (UTF-8, strict): control characters and text beyond the BMP in names
    are written in every format."""
    path = suite(tmp_path, '- name: "odd \\x01 \\U0001F512 name"\n  request: {http: "GET /healthz"}\n  expect: {outcome: deny}\n')
    for fmt in ("text", "json", "junit"):
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "test", "--format", fmt, str(path)],
            capture_output=True, cwd=ROOT, timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8:strict"},
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr.decode(errors="replace")
        assert b"Traceback" not in proc.stderr
        out = proc.stdout.decode("utf-8")
        assert "\U0001f512" in out or "\\ud83d\\udd12" in out, out


# --- explain and dev-token ---------------------------------------------------------------------


def test_explain_refuses_what_it_cannot_describe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = "[" * 20_000 + "]" * 20_000
    code, _, err = run(capsys, "explain", "--policy", str(EXAMPLE_POLICY), "--http", "GET /healthz", "--claim", f"x={deep}")
    assert (code, err.strip()) == (2, "stepup-sidecar explain: --claim x: the value is nested too deeply")

    for name, text, message in [
        ("date.yaml", 'http: "GET /healthz"\nat: 2026-02-30\n',
         "date.yaml:2:5: at: '2026-02-30' is not a date or time (day is out of range for month)"),
        ("deep.yaml", "x: " + "[" * 3000 + "]" * 3000, "deep.yaml:1:1003: invalid YAML: exceeded maximum nesting depth"),
        ("list.yaml", "[1, 2]\n", "list.yaml: a request description is a mapping"),
        ("scalar.yaml", "request: 5\n", "scalar.yaml: a request description is a mapping"),
    ]:  # fmt: skip
        (tmp_path / name).write_text(text)
        code, _, err = run(capsys, "explain", "--policy", str(EXAMPLE_POLICY), "--request", str(tmp_path / name))
        assert code == 2
        assert err.startswith(f"stepup-sidecar explain: {tmp_path}/{message}"), err

    code, _, err = run(
        capsys, "explain", "--policy", str(EXAMPLE_POLICY), "--http", BALANCE, "--claim", "sub=a", "--auth-age", "²"
    )
    assert (code, err.strip()) == (2, "stepup-sidecar explain: request.auth_age: '²' is not a duration (e.g. 90, 90s, 15m)")


def test_dev_token_refuses_a_missing_or_unusable_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.json"
    code, _, err = run(capsys, "dev-token", "--key", str(missing))
    assert (code, err.strip()) == (2, f"stepup-sidecar dev-token: --key {missing}: cannot read: No such file or directory")
    (tmp_path / "list.json").write_text("[1]")
    code, _, err = run(capsys, "dev-token", "--key", str(tmp_path / "list.json"))
    assert (code, err.strip()) == (2, f"stepup-sidecar dev-token: --key {tmp_path}/list.json: not a JWK (a JSON object)")
    (tmp_path / "nokty.json").write_text('{"kid": "dev-x"}')
    code, _, err = run(capsys, "dev-token", "--key", str(tmp_path / "nokty.json"))
    assert code == 2 and err.startswith(f"stepup-sidecar dev-token: --key {tmp_path}/nokty.json: not a usable private JWK")
    (tmp_path / "c.yaml").write_text("exp: 2026-02-30\n")
    code, _, err = run(capsys, "dev-token", "--claims-file", str(tmp_path / "c.yaml"))
    assert code == 2
    assert err.strip() == (
        f"stepup-sidecar dev-token: {tmp_path}/c.yaml:1:6: exp: '2026-02-30' is not a date or time"
        " (day is out of range for month)"
    )


# --- policies ----------------------------------------------------------------------------------


def _problems(text: str, file: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        parse_text(text, file)
    return [str(p) for p in e.value.problems]


def _example() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(example_policy_text())
    return data


def test_a_policy_scalar_yaml_cannot_construct_names_its_place() -> None:
    text = example_policy_text()
    assert "realm: bank\n" in text
    line = text[: text.index("realm: bank")].count("\n") + 1
    assert _problems(text.replace("realm: bank", "realm: 2026-02-30", 1), "p.yaml") == [
        f"p.yaml:{line}:8: realm: '2026-02-30' is not a date or time (day is out of range for month)"
    ]
    assert _problems(text.replace("realm: bank", "realm: " + "9" * 5000, 1), "p.yaml") == [
        f"p.yaml:{line}:8: realm: '{'9' * 40}'... is not an integer (more digits than a number may have)"
    ]


def test_a_policy_nested_too_deep_is_a_problem_not_a_crash() -> None:
    text = example_policy_text()
    [problem] = _problems(text + "\nx: " + "[" * 3000 + "]" * 3000, "p.yaml")
    assert problem.endswith("invalid YAML: exceeded maximum nesting depth")
    # JSON: the stdlib parser recurses; refused at the bracket that opens level 65.
    body = json.dumps(_example())
    deep = body[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}"
    [problem] = _problems(deep, "p.json")
    column = len(body[:-1] + ', "x": ') + 63 + 1  # the document's own brace is level 1
    assert problem == f"p.json:1:{column}: (document): invalid JSON: nested more than 64 levels deep"
    # Deep but within the parser: the schema names the first place that is wrong.
    data = _example()
    data["assurance"]["levels"] = json.loads("[" * 900 + "]" * 900)
    [problem] = _problems(json.dumps(data), "p.json")
    assert "assurance.levels[0]: " in problem and "is not of type 'string'" in problem


def test_a_json_policy_with_a_lone_surrogate_escape_is_refused() -> None:
    data = _example()
    data["issuers"][0]["jwt_authn_payload"] = "\udc80"
    assert _problems(json.dumps(data), "p.json") == [
        "p.json:1:1: issuers[0].jwt_authn_payload: '\\udc80' is not text (a lone surrogate escape)"
    ]
    data["issuers"][0]["jwt_authn_payload"] = "payload \U0001f512"  # escaped as a surrogate pair: text
    assert "\\ud83d\\udd12" in json.dumps(data)
    assert parse_text(json.dumps(data), "p.json").data["issuers"][0]["jwt_authn_payload"] == "payload \U0001f512"


def test_a_case_that_breaks_the_tool_fails_alone_and_the_suite_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net for what no check above foresaw: the case is a named failure (exit 1), the
    cases after it still run."""
    from sidecar import policytest

    real = policytest.wire_answer

    def breaks_on_balance(ev: Any, realm: str) -> Any:
        if "balance" in ev.decision.matched_rules:
            raise OverflowError("int too large to convert to float")
        return real(ev, realm)

    monkeypatch.setattr(policytest, "wire_answer", breaks_on_balance)
    path = suite(
        tmp_path,
        f'- name: breaks\n  request: {{http: "{BALANCE}", claims: {{sub: a, roles: [teller], amr: [pwd]}}}}\n'
        "  expect: {outcome: allow}\n"
        '- name: after\n  request: {http: "GET /healthz"}\n  expect: {outcome: allow}\n',
    )
    code, out, _ = run(capsys, "test", str(path))
    assert code == 1
    assert out.splitlines() == [
        f"FAIL  breaks  ({path}: cases[0])",
        "      the case could not be run: OverflowError: int too large to convert to float",
        f"PASS  after  ({path}: cases[1])",
        "1 passed, 1 failed",
    ]


# --- red-team round 3 (helper-10) ---------------------------------------------------------------


def _laughs(levels: int = 9) -> str:
    """Nine anchors, each ten of the one before: a 1 KB document that stands for a billion values."""
    out = ["l0: &l0 [x,x,x,x,x,x,x,x,x,x]"]
    out += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "{" + ", ".join(out) + "}"


LAUGHS = (
    "its aliases expand to more than 10,000,000 values, a string counting one per 16 characters"
    " (or refer to themselves)"
)


def test_yaml_aliases_that_expand_without_bound_are_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = suite(tmp_path, f'- name: c\n  request: {{http: "GET /healthz", headers: {_laughs()}}}\n')
    assert run(capsys, "test", str(path))[2].strip() == f"stepup-sidecar test: {path}: {LAUGHS}"
    (tmp_path / "r.yaml").write_text(f'http: "GET /healthz"\nheaders: {_laughs()}\n')
    code, _, err = run(capsys, "explain", "--policy", str(EXAMPLE_POLICY), "--request", str(tmp_path / "r.yaml"))
    assert (code, err.strip()) == (2, f"stepup-sidecar explain: {tmp_path}/r.yaml: {LAUGHS}")
    (tmp_path / "c.yaml").write_text(f"x: {_laughs()}\n")
    code, _, err = run(capsys, "dev-token", "--claims-file", str(tmp_path / "c.yaml"))
    assert (code, err.strip()) == (2, f"stepup-sidecar dev-token: {tmp_path}/c.yaml: {LAUGHS}")
    (tmp_path / "loop.yaml").write_text("x: &a [1, *a]\n")  # a list that holds itself
    code, _, err = run(capsys, "dev-token", "--claims-file", str(tmp_path / "loop.yaml"))
    assert (code, err.strip()) == (2, f"stepup-sidecar dev-token: {tmp_path}/loop.yaml: {LAUGHS}")
    text = example_policy_text().replace("realm: bank\n", f"realm: bank\nx-laughs: {_laughs()}\n")
    assert _problems(text, "p.yaml") == [f"p.yaml:1:1: (document): {LAUGHS}"]


def test_aliases_of_a_long_string_count_its_length(tmp_path: Path) -> None:
    """4,000 aliases of one 50 KB string are 4,000 values but 200 MB once written out (as the
    start-up validator hands a large policy over, in JSON): refused (helper-19 F4: 600 MB from a
    1.3 MB file). The same aliases of a short string are fine."""
    from sidecar.compiler import load_policy

    def policy(width: int) -> Path:
        head, _, _ = example_policy_text().partition("permissions:\n")
        out = [head, "permissions:\n", f"  - {{id: p0, match: [/p0], allow: {{users: [&s u{'x' * width}]}}}}\n"]
        out += [f"  - {{id: p{i}, match: [/p{i}], allow: {{users: [*s]}}}}\n" for i in range(1, 4000)]
        path = tmp_path / f"w{width}.yaml"
        path.write_text("".join(out))
        return path

    (tmp_path / "keys").symlink_to(EXAMPLE_POLICY.parent / "keys")
    with pytest.raises(PolicyError) as e:
        load_policy(policy(50_000))
    assert [p.message for p in e.value.problems] == [LAUGHS]
    assert load_policy(policy(10)).version.startswith("bank-demo@")  # not refused


def test_aliases_used_to_share_claims_still_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = suite(
        tmp_path,
        f'- name: a\n  request: {{http: "{BALANCE}", claims: &teller {{sub: a, roles: [teller], amr: [pwd]}}}}\n'
        "  expect: {outcome: allow}\n"
        f'- name: b\n  request: {{grpc: /bank.v1.Accounts/GetBalance, claims: *teller}}\n'
        "  expect: {outcome: allow}\n",
    )
    code, out, _ = run(capsys, "test", str(path))
    assert (code, out.splitlines()[-1]) == (0, "2 passed, 0 failed")


def test_jwt_authn_claims_deeper_than_a_struct_holds_fail_their_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def nested(depth: int) -> str:
        return "{a: " * depth + "1" + "}" * depth

    path = suite(
        tmp_path,
        f'- name: deep\n  request: {{http: "{BALANCE}", via: jwt_authn, claims: {{sub: a, n: {nested(31)}}}}}\n'
        "  expect: {outcome: allow}\n"
        f'- name: fits\n  request: {{http: "{BALANCE}", via: jwt_authn, claims: {{sub: a, roles: [teller],'
        f" amr: [pwd], n: {nested(29)}}}}}\n  expect: {{outcome: allow}}\n",
    )
    code, out, _ = run(capsys, "test", str(path))
    assert code == 1
    assert out.splitlines()[1] == (
        "      the request cannot be built: cases[0].request.claims.n: nested more than 30 levels deep"
        " (jwt_authn metadata, a protobuf Struct, holds no more)"
    )
    assert out.splitlines()[2] == f"PASS  fits  ({path}: cases[1])"


def test_keys_that_are_not_text_and_a_nul_in_the_policy_path_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"policy: {EXAMPLE_POLICY}\ncases: []\n1: x\n")
    assert run(capsys, "test", str(path))[2].strip() == f"stepup-sidecar test: {path}: unknown key(s) 1"
    (tmp_path / "r.yaml").write_text('http: "GET /healthz"\n1: x\nz: 2\n')
    code, _, err = run(capsys, "explain", "--policy", str(EXAMPLE_POLICY), "--request", str(tmp_path / "r.yaml"))
    assert code == 2 and err.startswith("stepup-sidecar explain: request: unknown key(s) 1, z (known: at, ")
    path.write_text('policy: "a\\x00b"\ncases: []\n')
    code, _, err = run(capsys, "test", str(path))
    assert code == 2 and err.rstrip().endswith("cannot read the file: embedded null byte")


def test_dev_token_refuses_claims_json_cannot_hold_and_keys_that_cannot_sign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = "stepup-sidecar dev-token: cannot make the token: "
    for argv, why in [
        (["--sub", "\udcff"], "UnicodeEncodeError: "),  # a command-line byte that is not UTF-8
        (["--claim", ".".join(["a"] * 2000) + "=1"], "RecursionError: "),
    ]:
        code, _, err = run(capsys, "dev-token", *argv)
        assert code == 2 and err.startswith(prefix + why), err
    (tmp_path / "c.yaml").write_text("auth_time: 2026-01-01T00:00:00Z\n")
    code, _, err = run(capsys, "dev-token", "--claims-file", str(tmp_path / "c.yaml"))
    assert code == 2 and err.startswith(prefix + "TypeError: Object of type datetime is not JSON serializable")
    (tmp_path / "nan.yaml").write_text("exp: .nan\n")
    code, _, err = run(capsys, "dev-token", "--claims-file", str(tmp_path / "nan.yaml"))
    assert code == 2 and err.startswith(prefix + "ValueError: Out of range float values are not JSON compliant")
    # On the command line NaN is no JSON: the claim is the string "NaN".
    code, out, _ = run(capsys, "dev-token", "--claim", "note=NaN")
    assert code == 0
    from joserfc import jwt
    from joserfc.jwk import KeySet

    keys = KeySet.import_key_set(json.loads((ROOT / "examples/keys/dev-jwks.json").read_text()))
    assert jwt.decode(out.strip(), keys).claims["note"] == "NaN"
    private = json.loads((ROOT / "examples/keys/dev-private-jwk.json").read_text())
    public = {k: v for k, v in private.items() if k in ("kty", "n", "e", "kid", "alg")}
    for name, jwk in [("none.json", {**private, "alg": "none"}), ("public.json", public)]:
        (tmp_path / name).write_text(json.dumps(jwk))
        code, _, err = run(capsys, "dev-token", "--key", str(tmp_path / name))
        assert code == 2 and err.startswith(("stepup-sidecar dev-token: cannot make the token: ",
                                             f"stepup-sidecar dev-token: --key {tmp_path}/{name}: ")), err  # fmt: skip


def test_policy_scalars_of_the_wrong_node_kind_and_durations_beyond_a_century() -> None:
    text = example_policy_text()
    line = text[: text.index("realm: bank")].count("\n") + 1
    for tag in ("!!map x", "!!set xyz"):
        assert _problems(text.replace("realm: bank", f"realm: {tag}", 1), "p.yaml") == [
            f"p.yaml:{line}:8: (document): invalid YAML: expected a mapping node, but found scalar"
        ]
    assert "max_age: 30m" in text
    at = text[: text.index("max_age: 30m")].count("\n") + 1
    for value, shown in [("9" * 5000 + "s", repr("9" * 5000 + "s")), ("9" * 4299 + "d", repr("9" * 4299 + "d")),
                         ("3153600001", "3153600001"), ("99999999999d", "'99999999999d'")]:  # fmt: skip
        [problem] = _problems(text.replace("max_age: 30m", f"max_age: {value}", 1), "p.yaml")
        assert problem.startswith(f"p.yaml:{at}:")
        assert "is not a duration (seconds up to 100 years, or e.g. 30s, 15m, 12h, 1d)" in problem
        assert len(problem) < 300 and shown[:40] in problem
    parse_text(text.replace("max_age: 30m", "max_age: 3153600000", 1), "p.yaml")  # 100 years is fine


def test_explain_an_auth_age_of_thousands_of_digits_names_its_place(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "explain", "--policy", str(EXAMPLE_POLICY), "--http", BALANCE, "--claim", "sub=a", "--auth-age", "9" * 5000
    )
    assert code == 2 and err.startswith("stepup-sidecar explain: request.auth_age: '99999"), err
    assert err.rstrip().endswith("is not a duration (e.g. 90, 90s, 15m)") or "is not a duration" in err
