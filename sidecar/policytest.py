"""`stepup-sidecar test`: run YAML test cases written next to a policy, like `opa test`.

A test file:

    policy: policy.yaml            # relative to this file (`--policy` overrides)
    cases:
      - name: a teller reads a balance with a password
        request:                   # see sidecar/cases.py for every key
          grpc: /bank.v1.Accounts/GetBalance
          claims: {sub: alice, roles: [teller], acr: "urn:okta:loa:1fa:any", amr: [pwd]}
          auth_age: 60
        expect:
          outcome: allow           # allow | deny | step_up | unauthenticated
          reason: allowed
          status: 200
          upstream: {x-auth-subject: alice, x-auth-assurance: aal1}   # null: not set / removed
      - name: the transfer needs a phishing-resistant login
        request: {...}
        expect: {outcome: step_up, reason: acr_too_low, acr_values: [phr, phrh], max_age: null}

Every key of `expect` is optional; the ones given must match: `outcome`, `reason`, `status`,
`error` (the challenge's RFC 6750/9470 error), `acr_values` and `max_age` (null: absent),
`scope`, `upstream` (header -> value, null for absent or removed), `rules` (rule ids that must be
among the matched ones). Each case runs the whole Check path (attributes, engine, response) of
the policy, at the case's `at` time.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from sidecar.cases import CaseError, PresetVerifier, build_request
from sidecar.compiler import load_policy
from sidecar.decision import Decision
from sidecar.policy import Policy
from sidecar.policyfile import YAMLProblem, load_yaml
from sidecar.runtime import Runtime, wire_answer
from sidecar.telemetry import Metrics, Telemetry

EXPECT_KEYS = frozenset(
    {"outcome", "reason", "status", "error", "acr_values", "max_age", "scope", "upstream", "rules"}
)
CASE_KEYS = frozenset({"name", "why", "request", "expect"})
_PARAM = re.compile(r'([A-Za-z0-9_-]+)=("(?:[^"\\]|\\.)*"|[^,\s]*)')


class SuiteError(ValueError):
    """A test file that cannot be run (not found, bad YAML, a malformed case)."""


@dataclass
class Case:
    name: str
    file: str
    where: str
    request: dict[str, Any]
    expect: dict[str, Any]


@dataclass
class Suite:
    file: str
    policy_file: Path | None
    cases: list[Case]


@dataclass
class Result:
    case: Case
    passed: bool
    diffs: list[str] = field(default_factory=list)
    got: dict[str, Any] = field(default_factory=dict)
    decision: Decision | None = None
    seconds: float = 0.0
    response: Any = None  # the CheckResponse
    request: Any = None  # the CheckRequest the case stood for
    presets: dict[str, Any] = field(default_factory=dict)  # its placeholder token -> claims


def _words(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _expect_problem(expect: Mapping[str, Any]) -> str | None:
    """What is wrong with an `expect` mapping's values (None: nothing), so that a case that could
    never be compared is refused up front rather than failing (or crashing) while compared."""
    for key in ("outcome", "reason", "error"):
        if key in expect and not isinstance(expect[key], str | None):
            return f"{key}: {expect[key]!r} is not a string"
    for key in ("status", "max_age"):
        v = expect.get(key)
        if key in expect and v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            return f"{key}: {v!r} is not an integer"
    for key in ("acr_values", "scope"):
        if key in expect and expect[key] is not None and not _words(expect[key]):
            return f"{key}: {expect[key]!r} is not a list of strings (or one space-separated string)"
    upstream = expect.get("upstream")
    if upstream is not None and not isinstance(upstream, dict):
        return f"upstream: {upstream!r} is not a mapping of header -> value (null: absent)"
    for name, value in (upstream or {}).items():
        if not isinstance(value, str | int | float | bool | None):
            return f"upstream.{name}: {value!r} is not a header value"
    rules = expect.get("rules")
    if rules is not None and not (isinstance(rules, list) and all(isinstance(r, str) for r in rules)):
        return f"rules: {rules!r} is not a list of rule ids"
    return None


def load_suite(path: Path) -> Suite:
    try:
        doc = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SuiteError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SuiteError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except YAMLProblem as e:
        raise SuiteError(e.at(path)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise SuiteError(f"{path}: a test file is a mapping with a `cases` list (and optionally `policy`)")
    unknown = set(doc) - {"policy", "cases"}
    if unknown:
        raise SuiteError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    cases = []
    for i, raw in enumerate(doc["cases"]):
        where = f"{path}: cases[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
            raise SuiteError(f"{where}: a case is a mapping with `name`, `request` and `expect`")
        bad = set(raw) - CASE_KEYS
        if bad:
            raise SuiteError(f"{where}: unknown key(s) {', '.join(sorted(map(str, bad)))}")
        expect = raw.get("expect", {})
        if not isinstance(expect, dict) or set(expect) - EXPECT_KEYS:
            raise SuiteError(
                f"{where}.expect: a mapping of {', '.join(sorted(EXPECT_KEYS))}"
                + (
                    f" (unknown: {', '.join(sorted(map(str, set(expect) - EXPECT_KEYS)))})"
                    if isinstance(expect, dict)
                    else ""
                )
            )
        problem = _expect_problem(expect)
        if problem:
            raise SuiteError(f"{where}.expect.{problem}")
        cases.append(
            Case(str(raw.get("name", f"case {i}")), str(path), f"cases[{i}]", raw["request"], expect)
        )
    policy = doc.get("policy")
    return Suite(str(path), (path.parent / policy) if isinstance(policy, str) else None, cases)


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def run_suite(suite: Suite, policy: Policy, select: re.Pattern[str] | None = None) -> list[Result]:
    verifier = PresetVerifier()
    clock = _Clock()
    runtime = Runtime(policy, Telemetry(None, decision_log=None, metrics=Metrics()), clock, verifier=verifier)
    loop = asyncio.new_event_loop()
    results = []
    try:
        for case in suite.cases:
            if select is not None and not select.search(case.name):
                continue
            started = time.perf_counter()
            try:
                built = build_request(case.request, policy, f"{case.where}.request")
            except CaseError as e:
                results.append(Result(case, False, [f"the request cannot be built: {e}"]))
                continue
            except Exception as e:  # what no check of build_request foresaw: this case fails, named
                results.append(
                    Result(case, False, [f"the request cannot be built: {type(e).__name__}: {e}"])
                )
                continue
            verifier.presets.update(built.presets)
            clock.now = built.at
            try:
                ev = loop.run_until_complete(runtime.evaluate(built.check))
                resp = wire_answer(ev, "stepup-test")
                got = observe(resp, ev.decision)
                diffs = compare(case.expect, got)
            except Exception as e:  # one case that breaks the tool fails alone, named
                results.append(Result(case, False, [f"the case could not be run: {type(e).__name__}: {e}"]))
                continue
            seconds = time.perf_counter() - started
            results.append(
                Result(case, not diffs, diffs, got, ev.decision, seconds, resp, built.check, built.presets)
            )
    finally:
        loop.close()
    return results


def observe(resp: Any, decision: Decision) -> dict[str, Any]:
    """What a case can expect, read off the wire answer."""
    md = resp.dynamic_metadata
    got: dict[str, Any] = {
        "outcome": md["outcome"],
        "reason": md["reason"],
        "status": 200 if resp.status.code == 0 else resp.denied_response.status.code,
        "rules": list(decision.matched_rules),
    }
    if resp.status.code == 0:
        got["upstream"] = {h.header.key: h.header.value for h in resp.ok_response.headers}
        got["removed"] = list(resp.ok_response.headers_to_remove)
        params: dict[str, str] = {}
    else:
        headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
        params = challenge_params(headers.get("www-authenticate", ""))
        got["upstream"] = {}
        got["removed"] = []
    got["error"] = params.get("error")
    got["acr_values"] = params["acr_values"].split() if "acr_values" in params else None
    got["max_age"] = int(params["max_age"]) if "max_age" in params else None
    got["scope"] = params["scope"].split() if "scope" in params else None
    return got


def challenge_params(value: str) -> dict[str, str]:
    """The auth-params of a `Bearer` challenge (enough for the sidecar's own answers)."""
    out = {}
    for name, raw in _PARAM.findall(value):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        out[name.lower()] = raw
    return out


def compare(expect: Mapping[str, Any], got: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in ("outcome", "reason", "status", "error", "max_age"):
        if key in expect and expect[key] != got.get(key):
            diffs.append(f"{key}: expected {_show(expect[key])}, got {_show(got.get(key))}")
    for key in ("acr_values", "scope"):
        if key in expect:
            want = expect[key]
            if isinstance(want, str):
                want = want.split()
            if want != got.get(key):
                diffs.append(f"{key}: expected {_show(want)}, got {_show(got.get(key))}")
    for name, want in (expect.get("upstream") or {}).items():
        have = got.get("upstream", {}).get(str(name).lower())
        if want is None:
            if have is not None:
                diffs.append(f"upstream {name}: expected absent, got {have!r}")
        elif str(want) != have:
            diffs.append(f"upstream {name}: expected {str(want)!r}, got {_show(have)}")
    for rule in expect.get("rules") or ():
        if rule not in got.get("rules", ()):
            diffs.append(f"rules: expected {rule!r} among the matched rules, got {got.get('rules')}")
    return diffs


def _show(v: Any) -> str:
    return "absent" if v is None else repr(v)


def coverage(policy: Policy, results: Iterable[Result]) -> dict[str, list[str]]:
    """The rules of each table that no case exercised: a sensitivity rule that never decided an
    operation, a permission rule that never granted, a risk rule that never fired."""
    used: dict[str, set[str]] = {"sensitivity": set(), "permissions": set(), "risk": set()}
    for r in results:
        d = r.decision
        if d is None:
            continue
        used["sensitivity"].add(d.sensitivity_rule)
        used["permissions"].add(d.permission_rule)
        if d.requirement is not None:
            used["risk"].update(d.requirement.risk_rules)
    return {table: [i for i in ids if i not in used[table]] for table, ids in policy.rule_ids.items()}


# --- reports -------------------------------------------------------------------------------------


def report_text(results: list[Result], uncovered: dict[str, list[str]] | None) -> str:
    lines = []
    for r in results:
        lines.append(f"{'PASS' if r.passed else 'FAIL'}  {r.case.name}  ({r.case.file}: {r.case.where})")
        lines.extend(f"      {d}" for d in r.diffs)
    failed = sum(1 for r in results if not r.passed)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    if uncovered is not None:
        missing = [f"{table}: {', '.join(ids)}" for table, ids in uncovered.items() if ids]
        total = sum(len(ids) for ids in uncovered.values())
        lines.append(
            "coverage: every rule exercised"
            if not missing
            else f"coverage: {total} rule(s) no case exercised"
        )
        lines.extend(f"  {m}" for m in missing)
    return "\n".join(lines)


def report_json(results: list[Result], uncovered: dict[str, list[str]] | None) -> str:
    doc: dict[str, Any] = {
        "passed": sum(1 for r in results if r.passed),
        "failed": sum(1 for r in results if not r.passed),
        "cases": [
            {
                "name": r.case.name,
                "file": r.case.file,
                "where": r.case.where,
                "passed": r.passed,
                "diffs": r.diffs,
                "got": {k: v for k, v in r.got.items() if k != "removed"},
            }
            for r in results
        ],
    }
    if uncovered is not None:
        doc["uncovered"] = uncovered
    return json.dumps(doc, indent=2)


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(v: str) -> str:
    """Text XML 1.0 can carry: a character it cannot (a control character in a case name, say)
    shown as its escape, so the report stays well-formed for every CI that reads it."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", v)


def report_junit(results: list[Result]) -> str:
    suites = ET.Element("testsuites")
    by_file: dict[str, list[Result]] = {}
    for r in results:
        by_file.setdefault(r.case.file, []).append(r)
    for file, rs in by_file.items():
        failures = sum(1 for r in rs if not r.passed)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=_xml_text(file),
            tests=str(len(rs)),
            failures=str(failures),
            errors="0",
            time=f"{sum(r.seconds for r in rs):.3f}",
        )
        for r in rs:
            tc = ET.SubElement(
                suite, "testcase", classname=_xml_text(file), name=_xml_text(r.case.name),
                time=f"{r.seconds:.3f}",
            )  # fmt: skip
            if not r.passed:
                failure = ET.SubElement(tc, "failure", message=_xml_text(r.diffs[0] if r.diffs else "failed"))
                failure.text = _xml_text("\n".join(r.diffs))
    return ET.tostring(suites, encoding="unicode")


def main(files: list[str], *, policy_file: str | None, fmt: str, run: str | None, with_coverage: bool) -> int:
    """The `test` command: 0 when every case passed, 1 when one failed, 2 when a file is unusable."""
    import sys

    from sidecar.policyfile import PolicyError

    try:
        select = re.compile(run) if run else None
    except re.error as e:
        print(f"stepup-sidecar test: --run {run!r}: {e}", file=sys.stderr)
        return 2
    results: list[Result] = []
    uncovered: dict[str, list[str]] | None = None
    policies: dict[Path, tuple[Policy, list[Result]]] = {}
    try:
        for f in files:
            suite = load_suite(Path(f))
            path = Path(policy_file) if policy_file else suite.policy_file
            if path is None:
                raise SuiteError(f"{f}: no `policy:` in the file and no --policy given")
            if path not in policies:
                policies[path] = (load_policy(path), [])
            policy, of_policy = policies[path]
            ran = run_suite(suite, policy, select)
            of_policy += ran
            results += ran
    except (SuiteError, PolicyError) as e:
        print(f"stepup-sidecar test: {e}", file=sys.stderr)
        return 2
    if with_coverage:
        uncovered = {"sensitivity": [], "permissions": [], "risk": []}
        for policy, of_policy in policies.values():
            for table, ids in coverage(policy, of_policy).items():
                uncovered[table] += [i for i in ids if i not in uncovered[table]]
    if fmt == "json":
        print(report_json(results, uncovered))
    elif fmt == "junit":
        print(report_junit(results))
    else:
        print(report_text(results, uncovered))
    return 0 if all(r.passed for r in results) else 1
