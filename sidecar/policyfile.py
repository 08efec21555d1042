"""A policy file -> a validated document: YAML (or JSON) parsed, checked against the JSON Schema,
every problem located by file, line, column and place in the document (`permissions[2].allow`).

No I/O beyond the text given, nothing compiled: `compiler.py` turns the document into a Policy.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jsonschema
import yaml

from sidecar.text import SURROGATE_ESCAPE, is_text

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
            try:
                node = yaml.compose(self.text, Loader=_Loader)
            except yaml.YAMLError:
                # JSON that YAML cannot read (a "\udc80" escape, say): problems stay at 1:1.
                return self._marks
            if node is not None:
                self._marks = _node_marks(node)
        return self._marks

    def problem(self, path: PathT, message: str) -> Problem:
        marks = self.marks()
        p = path
        while p not in marks and p:
            p = p[:-1]
        line, col = marks.get(p, (1, 1))
        return Problem(self.file, line, col, _where(path), message)


def _node_marks(root: yaml.Node) -> dict[PathT, tuple[int, int]]:
    """The line and column of every node by its path (a loop, not recursion: a document nested
    a thousand deep is located too). Raises _DupKey at a mapping's second use of a key."""
    marks: dict[PathT, tuple[int, int]] = {}
    walked: set[int] = set()  # an alias is the node it names: walked once (`&r [*r]` is endless)
    todo: list[tuple[yaml.Node, PathT]] = [(root, ())]
    while todo:
        node, path = todo.pop()
        marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if id(node) in walked:
            continue
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for knode, vnode in node.value:
                key = knode.value if isinstance(knode, yaml.ScalarNode) else repr(knode)
                if key in seen:
                    raise _DupKey(path, key, knode.start_mark.line + 1, knode.start_mark.column + 1)
                seen.add(key)
                todo.append((vnode, (*path, key)))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((v, (*path, i)) for i, v in enumerate(node.value))
    return marks


class ScalarError(yaml.constructor.ConstructorError):
    """A scalar YAML resolved (or was tagged) as a type it is not: `2026-02-30` (a date that does
    not exist), `!!int x`, `0b_`, a 5,000-digit integer. PyYAML raises a bare ValueError, KeyError
    or AttributeError for these, with no place; this one has the scalar's mark."""


_SCALAR_TYPES = {
    "tag:yaml.org,2002:timestamp": "a date or time",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
}


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def _located_scalars(cls: type[yaml.SafeLoader]) -> type[yaml.SafeLoader]:
    """The loader class with its scalar constructors raising ScalarError for what they cannot
    construct (the common case, a scalar that constructs, costs one try block)."""
    for tag, what in _SCALAR_TYPES.items():
        construct = cls.yaml_constructors[tag]

        def located(loader: Any, node: Any, construct: Any = construct, what: str = what) -> Any:
            try:
                return construct(loader, node)
            except (ValueError, KeyError, AttributeError, OverflowError) as e:
                why = ""
                if what == "a date or time" and isinstance(e, ValueError):
                    why = f" ({e})"  # "day is out of range for month"
                elif what == "an integer" and len(str(node.value)) > 4000:
                    why = " (more digits than a number may have)"
                raise ScalarError(
                    None, None, f"{_short(str(node.value))} is not {what}{why}", node.start_mark
                ) from None

        cls.add_constructor(tag, located)
    return cls


@_located_scalars
class SafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """yaml.SafeLoader (libyaml when available: it refuses nesting past 1,000 levels, where the
    pure-Python composer would run out of stack) whose scalars that cannot be constructed fail
    with ScalarError, for the test files and request descriptions of `test` and `explain`."""


class YAMLProblem(ValueError):
    """Why a YAML text could not be loaded, with its line and column when known (`str()`: the
    place and the problem, `3:9: cases[0].request.at: '2026-02-30' is not a date or time`)."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(f"{line}:{column}: {message}" if line is not None else message)
        self.message, self.line, self.column = message, line, column

    def at(self, file: object) -> str:
        """The problem prefixed by the file, as `file:line:col: ...` or `file: ...`."""
        return f"{file}:{self}" if self.line is not None else f"{file}: {self}"


# YAML aliases let a small document stand for a huge one ("billion laughs": nine anchors, each
# ten of the one before, are a billion values). Loading shares the aliased objects, so it is
# cheap; whatever walks the values (validation, str(), the JSON encoder) is not.
MAX_EXPANDED_VALUES = 10_000_000
TEXT_UNIT = 16  # a string counts as one value per this many characters (and one for itself)
ALIASES_TOO_FAR = (
    f"its aliases expand to more than {MAX_EXPANDED_VALUES:,} values, a string counting one per"
    f" {TEXT_UNIT} characters (or refer to themselves)"
)


def expanded_size(data: Any, limit: int = MAX_EXPANDED_VALUES) -> int:
    """How many values `data` holds once every alias is expanded (counted per distinct object,
    in a loop: linear in what was loaded); stops counting past `limit`. A string counts one more
    per TEXT_UNIT characters, key or value: shared in this process, an aliased string is written
    out again at each alias when the document is handed over as JSON (helper-19 F4: a 1.3 MB file
    of 4,000 aliases to a 50 KB string took 600 MB). A structure that contains itself
    (`&a [*a]`) is endless: limit + 1."""
    sizes: dict[int, int] = {}
    path: set[int] = set()  # the containers being counted: an ancestor met again is a cycle
    todo: list[tuple[Any, bool]] = [(data, False)]
    while todo:
        node, children_done = todo.pop()
        if not isinstance(node, dict | list) or (not children_done and id(node) in sizes):
            continue
        kids = list(node.values()) if isinstance(node, dict) else node
        if not children_done:
            if id(node) in path:
                return limit + 1
            path.add(id(node))
            todo.append((node, True))
            todo.extend((k, False) for k in kids if isinstance(k, dict | list) and id(k) not in sizes)
            continue
        path.discard(id(node))
        total = 1
        if isinstance(node, dict):
            total += sum(len(k) // TEXT_UNIT for k in node if type(k) is str)
        for k in kids:
            if isinstance(k, dict | list):
                total += sizes.get(id(k), 1)
            else:
                total += 1 + len(k) // TEXT_UNIT if type(k) is str else 1
            if total > limit:
                return total
        sizes[id(node)] = total
    return sizes.get(id(data), 1)


def _aliases_expand_too_far(text: str, data: Any) -> bool:
    return "&" in text and expanded_size(data) > MAX_EXPANDED_VALUES  # no anchor, no alias


def load_yaml(text: str) -> Any:
    """The document of a test file or request description. Raises YAMLProblem naming the line,
    the column, the place when it can be named and the problem: invalid YAML, a scalar that is
    not what it resolved as (`2026-02-30`), nesting too deep."""
    try:
        data = yaml.load(text, Loader=SafeLoader)  # noqa: S506 (a SafeLoader subclass)
        if _aliases_expand_too_far(text, data):
            raise YAMLProblem(ALIASES_TOO_FAR)
        return data
    except ScalarError as e:
        line, col, where, problem = _scalar_problem(text, e)
        raise YAMLProblem(f"{where}: {problem}" if where else problem, line, col) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        if mark is None:
            raise YAMLProblem(f"invalid YAML: {e.problem}") from None
        raise YAMLProblem(f"invalid YAML: {e.problem}", mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as e:
        raise YAMLProblem(f"invalid YAML: {e}") from None
    except RecursionError:
        raise YAMLProblem("invalid YAML: nested too deeply") from None


def _scalar_problem(text: str, e: ScalarError) -> tuple[int, int, str, str]:
    """(line, column, place, problem) of a scalar YAML could not construct."""
    mark = e.problem_mark
    assert mark is not None  # ScalarError always has the scalar's mark
    return mark.line + 1, mark.column + 1, yaml_place(text, mark), str(e.problem)


def yaml_place(text: str, mark: Any) -> str:
    """The place in the document (`cases[0].request.at`) of the node that starts at `mark`, or ""
    when the text cannot be composed."""
    try:
        node = yaml.compose(text, Loader=SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return ""
    if node is None:
        return ""
    try:
        marks = _node_marks(node)
    except _DupKey:
        return ""
    at = (mark.line + 1, mark.column + 1)
    # The deepest node starting there: a mapping and its first key's value can share a mark.
    found = [path for path, m in marks.items() if m == at]
    return _where(max(found, key=len)) if found else ""


@_located_scalars
class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader (libyaml when available) that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # `!!map x`: the stock error, with its place
            return super().construct_mapping(node, deep=deep)
        seen: set[Any] = set()
        for knode, _ in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else id(knode)
            if key in seen:
                raise _DupKey((), key, knode.start_mark.line + 1, knode.start_mark.column + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]

    def construct_document(self, node: yaml.Node) -> Any:
        """The document built by `_fast_document` when it can be (every node a plain mapping,
        sequence or scalar of the core types: what a policy is), else by PyYAML's constructor."""
        try:
            return _fast_document(self, node)
        except _NotFast:
            return super().construct_document(node)


_TAG = "tag:yaml.org,2002:"
_FAST_SCALARS = frozenset(_TAG + t for t in ("null", "bool", "int", "float", "timestamp"))
_STR, _MAP, _SEQ = _TAG + "str", _TAG + "map", _TAG + "seq"
_SPECIAL_KEYS = frozenset((_TAG + "merge", _TAG + "value"))


class _NotFast(Exception):
    """A node `_fast_document` leaves to PyYAML: a merge key, a set, an ordered map, a custom or
    unknown tag, a key that is a mapping or a sequence, ..."""


def _fast_document(loader: Any, root: yaml.Node) -> Any:
    """What PyYAML's SafeConstructor (with `_Loader`'s duplicate-key refusal) builds from the
    composed nodes, built in a loop instead of through a generator and three calls a node: a
    100,000-rule policy loads in ~40 % of the time. Containers are made first and filled after,
    so an alias is the same object, as with PyYAML. Scalars other than text go through the
    loader's own constructors (located errors). Checked against PyYAML's result in
    tests/test_policy_yaml_fast.py."""
    made: dict[int, Any] = {}
    fill: list[tuple[yaml.Node, Any]] = []
    constructors = loader.yaml_constructors

    def get(node: yaml.Node) -> Any:
        key = id(node)
        if key in made:
            return made[key]
        tag, kind = node.tag, type(node)
        if kind is yaml.ScalarNode:
            if tag == _STR:
                value: Any = node.value
            elif tag in _FAST_SCALARS:
                value = constructors[tag](loader, node)
            else:
                raise _NotFast
        elif kind is yaml.MappingNode and tag == _MAP:
            value = {}
            fill.append((node, value))
        elif kind is yaml.SequenceNode and tag == _SEQ:
            value = []
            fill.append((node, value))
        else:
            raise _NotFast
        made[key] = value
        return value

    # In PyYAML's order, so that the first problem found is the one it finds: containers filled
    # level by level in document order (its state generators), a mapping's duplicate keys
    # refused before any of its entries is built (`_Loader.construct_mapping`), a key before
    # its value.
    # A text scalar is its node's value, aliased or not (the same str object): taken in place,
    # without a call (most of a policy's nodes).
    scalar_node = yaml.ScalarNode
    result = get(root)
    queue = deque(fill)
    fill.clear()
    while queue:
        node, obj = queue.popleft()
        if type(obj) is list:
            obj.extend([v.value if type(v) is scalar_node and v.tag == _STR else get(v) for v in node.value])
        else:
            seen: set[Any] = set()
            for knode, _ in node.value:
                if type(knode) is not yaml.ScalarNode or knode.tag in _SPECIAL_KEYS:
                    raise _NotFast
                if knode.value in seen:
                    raise _DupKey((), knode.value, knode.start_mark.line + 1, knode.start_mark.column + 1)
                seen.add(knode.value)
            for knode, vnode in node.value:
                key = knode.value if knode.tag == _STR else get(knode)  # (a scalar: checked above)
                obj[key] = vnode.value if type(vnode) is scalar_node and vnode.tag == _STR else get(vnode)
        queue.extend(fill)
        fill.clear()
    return result


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
        if _aliases_expand_too_far(text, doc.data):
            raise PolicyError([Problem(file, 1, 1, "", ALIASES_TOO_FAR)])
    except _DupKey as e:
        raise PolicyError(
            [Problem(file, e.line, e.column, _where((*e.path, e.key)), "duplicate key")]
        ) from None
    except ScalarError as e:
        raise PolicyError([Problem(file, *_scalar_problem(text, e))]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PolicyError([Problem(file, line, col, "", f"invalid YAML: {e.problem}")]) from None
    except yaml.YAMLError as e:
        raise PolicyError([Problem(file, 1, 1, "", f"invalid YAML: {e}")]) from None
    except RecursionError:  # PyYAML's own composer, without libyaml (which stops at 1,000 levels)
        raise PolicyError([Problem(file, 1, 1, "", "invalid YAML: nested too deeply")]) from None
    return _validated(doc)


def _parse_json(text: str, file: str) -> Document:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DupKey as e:
        raise PolicyError([Problem(file, 1, 1, str(e.key), "duplicate key")]) from None
    except ValueError as e:
        line, col = (e.lineno, e.colno) if isinstance(e, json.JSONDecodeError) else (1, 1)
        raise PolicyError([Problem(file, line, col, "", f"invalid JSON: {e}")]) from None
    except RecursionError:
        line, col = _too_deep_at(text)
        raise PolicyError(
            [Problem(file, line, col, "", f"invalid JSON: nested more than {MAX_DEPTH} levels deep")]
        ) from None
    doc = Document(file, None, data)
    doc.text = text  # for locating problems (YAML reads JSON) only when there are some
    if SURROGATE_ESCAPE.search(text):  # rare (an emoji escaped as a pair): only then a walk
        for path, value in _strings(data):
            if not is_text(value):
                raise PolicyError(
                    [doc.problem(path, f"{_short(value)} is not text (a lone surrogate escape)")]
                )
    return _validated(doc)


# A policy needs a handful of levels; deeper is refused where it would otherwise exhaust the stack.
MAX_DEPTH = 64
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]')


def _too_deep_at(text: str) -> tuple[int, int]:
    """The line and column of the bracket that opens level MAX_DEPTH + 1 of a JSON text (1:1 if
    none does)."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, m.start()) + 1
                return line, m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
        elif tok in "]}":
            depth -= 1
    return 1, 1


def _too_deep(data: Any) -> PathT | None:
    """The path of the first node more than MAX_DEPTH levels down (None: there is none); a loop,
    so it works where recursion ran out."""
    todo: list[tuple[Any, PathT]] = [(data, ())]
    while todo:
        node, path = todo.pop()
        if len(path) > MAX_DEPTH:
            return path
        if isinstance(node, dict):
            todo.extend((v, (*path, str(k))) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((v, (*path, i)) for i, v in enumerate(node))
    return None


def _strings(data: Any) -> Iterator[tuple[PathT, str]]:
    """Every string of a document (keys too, at their mapping's path), with its path."""
    todo: list[tuple[Any, PathT]] = [(data, ())]
    while todo:
        node, path = todo.pop()
        if isinstance(node, str):
            yield path, node
        elif isinstance(node, dict):
            for k, v in node.items():
                if isinstance(k, str):
                    yield path, k
                todo.append((v, (*path, str(k))))
        elif isinstance(node, list):
            todo.extend((v, (*path, i)) for i, v in enumerate(node))


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
    try:
        found = _problems(data)
    except RecursionError:  # jsonschema descends (and reprs) a deeply nested value
        deep = _too_deep(data) or ()
        found = [(deep[:3], f"nested more than {MAX_DEPTH} levels deep")]  # where it starts
    for path, message in found:
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
            found += _non_text_keys(skeleton)
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


def _non_text_keys(data: Any) -> list[tuple[PathT, str]]:
    """Every mapping key that is not text (YAML's `1:`, `yes:`, `~:`): the schema cannot tell
    (its key patterns apply to text only), and a policy handed over as JSON (the start-up
    validator's) would read it as text, a meaning the file does not have (helper-19 F3). The rule
    lists are not walked: their keys are checked with each rule."""
    found: list[tuple[PathT, str]] = []
    seen: set[int] = set()  # (an alias: the same object, walked once)
    todo: list[tuple[Any, PathT]] = [(data, ())]
    while todo:
        node, path = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    found.append(((*path, str(k)), f"the key {_clip(repr(k), 80)} is not text: quote it"))
                elif isinstance(v, dict | list):
                    todo.append((v, (*path, k)))
        elif isinstance(node, list):
            todo.extend((v, (*path, i)) for i, v in enumerate(node) if isinstance(v, dict | list))
    return sorted(found, key=lambda f: list(map(str, f[0])))


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
        return _clip(err.message.replace("Additional properties are not allowed", "unknown key(s)"))
    if err.validator == "pattern":
        return f"{_clip(repr(err.instance), 80)} does not have the expected form"
    desc = err.schema.get("description", "") if isinstance(err.schema, dict) else ""
    if err.validator == "oneOf" and "unit s, m, h or d" in str(desc):
        what = "seconds up to 100 years, or e.g. 30s, 15m, 12h, 1d"
        return f"{_clip(repr(err.instance), 80)} is not a duration ({what})"
    return _clip(err.message)


def _clip(text: str, limit: int = 300) -> str:
    """A message that quotes a huge value (5,000 digits, a list nested 900 deep) kept readable."""
    return text if len(text) <= limit else f"{text[: limit - 40]}...{text[-30:]}"
