"""A policy file -> a validated document: YAML (or JSON) parsed, checked against the JSON Schema,
every problem located by file, line, column and place in the document (`permissions[2].allow`).

No I/O beyond the text given, nothing compiled: `compiler.py` turns the document into a Policy.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jsonschema
import yaml

PathT = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    column: int
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.where or '(document)'}: {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def schema() -> dict[str, Any]:
    text = resources.files("sidecar").joinpath("policy.schema.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """The schema with every local `$ref` replaced by its target: same meaning, but validation
    skips reference resolution, which dominated the load time of large policies."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and len(node) == 1:
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


_SCHEMA = schema()
_INLINED = _inline_refs(_SCHEMA, _SCHEMA["$defs"])
# JSON Schema counts 1.0 as an integer; the compiler (and a reader) does not: `max_age: 3600.0`
# or `raise: 1.0` is refused at its place instead of failing later without one.
_Validator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool)
    ),
)
_VALIDATOR = _Validator(_INLINED)
_SENS_RULE = _Validator(_INLINED["properties"]["sensitivity"]["properties"]["rules"]["items"])
_PERM_RULE = _Validator(_INLINED["properties"]["permissions"]["items"])


def _where(path: PathT) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class Document:
    """A policy document: its data plus, when a problem must be located, the line/column of every
    node.

    The common case (a valid file) parses once with libyaml; marks are computed only when there
    is a problem to report, so large policies load fast."""

    def __init__(self, file: str, text: str | None, data: Any = None) -> None:
        """`text` is the YAML to parse; with `text=None`, `data` is an already parsed document
        (problems are then located by path only, at 1:1)."""
        self.file = file
        self.text = text
        self._marks: dict[PathT, tuple[int, int]] | None = None
        if text is None:
            self.data: Any = data
            return
        try:
            self.data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        except _DupKey:
            self.marks()  # raises _DupKey with the key's full path

    def marks(self) -> dict[PathT, tuple[int, int]]:
        if self._marks is None:
            self._marks = {}
            if self.text is None:
                return self._marks
            node = yaml.compose(self.text, Loader=_Loader)
            if node is not None:
                self._walk(node, ())
        return self._marks

    def _walk(self, node: yaml.Node, path: PathT) -> None:
        assert self._marks is not None
        self._marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for knode, vnode in node.value:
                key = knode.value if isinstance(knode, yaml.ScalarNode) else repr(knode)
                if key in seen:
                    raise _DupKey(path, key, knode.start_mark.line + 1, knode.start_mark.column + 1)
                seen.add(key)
                self._walk(vnode, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, (*path, i))

    def problem(self, path: PathT, message: str) -> Problem:
        marks = self.marks()
        p = path
        while p not in marks and p:
            p = p[:-1]
        line, col = marks.get(p, (1, 1))
        return Problem(self.file, line, col, _where(path), message)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader (libyaml when available) that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for knode, _ in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else id(knode)
            if key in seen:
                raise _DupKey((), key, knode.start_mark.line + 1, knode.start_mark.column + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


class _DupKey(Exception):
    def __init__(self, path: PathT, key: Any, line: int, column: int) -> None:
        self.path = path
        self.key = key
        self.line = line
        self.column = column


def parse_duration(v: int | str) -> int:
    if isinstance(v, int):
        return v
    n, unit = int(v[:-1]), v[-1]
    return n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def content_digest(text: str) -> str:
    """The content hash in a policy's version (`name@digest`)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_text(text: str, file: str) -> Document:
    """The YAML (or, for a `.json` file, JSON) parsed and checked against the schema (every
    problem, located). JSON parses about ten times faster than YAML: use it for very large,
    generated policies; YAML is a superset of JSON, so problems are located the same way."""
    if file.endswith(".json"):
        return _parse_json(text, file)
    try:
        doc = Document(file, text)
    except _DupKey as e:
        raise PolicyError(
            [Problem(file, e.line, e.column, _where((*e.path, e.key)), "duplicate key")]
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PolicyError([Problem(file, line, col, "", f"invalid YAML: {e.problem}")]) from None
    except yaml.YAMLError as e:
        raise PolicyError([Problem(file, 1, 1, "", f"invalid YAML: {e}")]) from None
    return _validated(doc)


def _parse_json(text: str, file: str) -> Document:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DupKey as e:
        raise PolicyError([Problem(file, 1, 1, str(e.key), "duplicate key")]) from None
    except ValueError as e:
        line, col = (e.lineno, e.colno) if isinstance(e, json.JSONDecodeError) else (1, 1)
        raise PolicyError([Problem(file, line, col, "", f"invalid JSON: {e}")]) from None
    doc = Document(file, None, data)
    doc.text = text  # for locating problems (YAML reads JSON) only when there are some
    return _validated(doc)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DupKey((), k, 1, 1)
        out[k] = v
    return out


def _validated(doc: Document) -> Document:
    data = doc.data
    problems: list[Problem] = []
    for path, message in _problems(data):
        problems.append(doc.problem(path, message))
    if problems:
        raise PolicyError(problems)
    assert isinstance(data, dict)
    return doc


def _problems(data: Any) -> list[tuple[PathT, str]]:
    """Every schema problem as (path, message). The rule lists (which make up nearly all of a large
    policy) are checked by a direct test of each rule first; only a rule that fails it goes
    through jsonschema, for the exact message. The rest of the document always does."""
    found: list[tuple[PathT, str]] = []
    if isinstance(data, dict):
        rules = {
            "sensitivity": data["sensitivity"].get("rules")
            if isinstance(data.get("sensitivity"), dict)
            else None,
            "permissions": data.get("permissions"),
        }
        if isinstance(rules["sensitivity"], list) and isinstance(rules["permissions"], list):
            skeleton = {**data, "permissions": [], "sensitivity": {**data["sensitivity"], "rules": []}}
            errors = sorted(_VALIDATOR.iter_errors(skeleton), key=lambda e: list(map(str, e.absolute_path)))
            found += [(tuple(e.absolute_path), _schema_message(e)) for e in errors]
            for base, items, fast, validator in (
                (("sensitivity", "rules"), rules["sensitivity"], _sensitivity_rule_ok, _SENS_RULE),
                (("permissions",), rules["permissions"], _permission_rule_ok, _PERM_RULE),
            ):
                for i, item in enumerate(items):
                    if fast(item):
                        continue
                    errors = sorted(
                        validator.iter_errors(item), key=lambda e: list(map(str, e.absolute_path))
                    )
                    found += [((*base, i, *e.absolute_path), _schema_message(e)) for e in errors]
            return found
    errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    return [(tuple(e.absolute_path), _schema_message(e)) for e in errors]


_ID = re.compile(_SCHEMA["$defs"]["id"]["pattern"])
_NAME = re.compile(_SCHEMA["$defs"]["name"]["pattern"])
_PATTERN = re.compile(_SCHEMA["$defs"]["patterns"]["items"]["pattern"])
_SUBJECT_LISTS = ("issuers", "users", "roles", "groups", "scopes", "principals")


def _strings_ok(v: Any) -> bool:
    return (
        isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v) and len(set(v)) == len(v)
    )


def _patterns_ok(v: Any) -> bool:
    return (
        isinstance(v, list)
        and bool(v)
        and all(isinstance(x, str) and _PATTERN.match(x) is not None for x in v)
    )


_SENS_KEYS = ({"id", "match", "level"}, {"id", "match", "level", "mode"})
_PERM_KEYS = ({"id", "match", "allow"}, {"id", "match", "allow", "mode"})


def _mode_ok(r: dict[str, Any]) -> bool:
    return r.get("mode", "enforce") in ("enforce", "shadow")


def _sensitivity_rule_ok(r: Any) -> bool:
    """The schema's sensitivity rule, tested directly (the fast path; jsonschema explains a no)."""
    return (
        isinstance(r, dict)
        and r.keys() in _SENS_KEYS
        and _mode_ok(r)
        and isinstance(r["id"], str)
        and _ID.match(r["id"]) is not None
        and isinstance(r["level"], str)
        and _NAME.match(r["level"]) is not None
        and _patterns_ok(r["match"])
    )


def _permission_rule_ok(r: Any) -> bool:
    """The schema's permission rule, tested directly (the fast path; jsonschema explains a no)."""
    if not (
        isinstance(r, dict)
        and r.keys() in _PERM_KEYS
        and _mode_ok(r)
        and isinstance(r["id"], str)
        and _ID.match(r["id"]) is not None
        and _patterns_ok(r["match"])
        and isinstance(r["allow"], dict)
        and r["allow"]
    ):
        return False
    for k, v in r["allow"].items():
        if k in ("anyone", "authenticated"):
            if v is not True:
                return False
        elif k not in _SUBJECT_LISTS or not _strings_ok(v):
            return False
    return True


def _schema_message(err: jsonschema.ValidationError) -> str:
    if err.validator == "additionalProperties":
        return err.message.replace("Additional properties are not allowed", "unknown key(s)")
    if err.validator == "pattern":
        return f"{err.instance!r} does not have the expected form"
    desc = err.schema.get("description", "") if isinstance(err.schema, dict) else ""
    if err.validator == "oneOf" and "unit s, m, h or d" in str(desc):
        return f"{err.instance!r} is not a duration (seconds, or e.g. 30s, 15m, 12h, 1d)"
    return err.message
