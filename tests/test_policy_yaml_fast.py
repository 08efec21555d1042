"""The policy loader's own YAML constructor (policyfile._fast_document) builds exactly what
PyYAML's SafeConstructor builds, with `_Loader`'s duplicate-key refusal: same values, same types
(1, 1.0 and True are equal in Python, not here), aliases the same object, the same errors.

A policy is security input: a value read differently would be a rule enforced differently.
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.decide import generated_policy
from sidecar import policyfile
from sidecar.policyfile import PolicyError, parse_text
from tests.helpers import EXAMPLE_POLICY, example_policy_text


class Reference(policyfile._Loader):
    """_Loader with PyYAML's own constructor (the fast one bypassed)."""

    def construct_document(self, node: Any) -> Any:
        return yaml.constructor.BaseConstructor.construct_document(self, node)


def typed(x: Any) -> Any:
    """x with every value tagged by its type, so that 1, 1.0 and True differ."""
    if isinstance(x, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in x.items()])
    if isinstance(x, list):
        return ("list", [typed(v) for v in x])
    if isinstance(x, float) and x != x:
        return ("float", "nan")
    return (type(x).__name__, x)


def outcome(text: str, loader: type) -> Any:
    try:
        return ("ok", typed(yaml.load(text, Loader=loader)))
    except policyfile._DupKey as e:
        return ("error", "_DupKey", e.key, e.line, e.column)
    except Exception as e:
        return ("error", type(e).__name__, str(e))


def same(text: str) -> None:
    assert outcome(text, policyfile._Loader) == outcome(text, Reference), text


def test_the_example_and_a_generated_policy_load_the_same() -> None:
    same(example_policy_text())
    same(generated_policy(2_000, Path(tempfile.mkdtemp())).read_text())
    assert EXAMPLE_POLICY.exists()


EDGES = [
    "",  # an empty document: None
    "42\n",
    "a: 1\nb: 1.0\nc: true\nd: ~\ne: null\nf: 'yes'\ng: yes\nh: on\ni: 0o17\nj: 0x1F\nk: 1_000\nl: 1:30\n",
    "a: .inf\nb: -.Inf\nc: .nan\nd: 1e3\ne: +1\nf: 2026-01-01\ng: 2026-01-01T10:00:00Z\nh: 2026-01-01 10:00:00.5 +02:00\n",
    "a: !!str 123\nb: !!int '12'\nc: !!float '1'\nd: !!bool 'true'\ne: !!null ''\n",
    "base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n",  # a merge key: PyYAML's way
    "a: !!set {x, y}\n",
    "a: !!omap [{x: 1}, {y: 2}]\n",
    "a: !!binary aGVsbG8=\n",
    "? [a, b]\n: c\n",  # an unhashable key: the same error
    "? {a: 1}\n: c\n",
    "a: &x [1, 2]\nb: *x\n",
    "a: &x [1, *x]\n",  # a list that holds itself
    "a: &m {b: *m}\n",
    "a: 1\na: 2\n",  # a duplicate key
    "a: {b: 1, b: 2}\n",
    "1: x\n'1': y\n",  # the same text, two types: refused as a duplicate by _Loader either way
    "a: 2026-02-30\n",  # a date that does not exist: the located error
    "a: !!int x\n",
    "a: !!map x\n",
    "a: !!str {b: 1}\n",
    "a: !custom 1\n",
    "a: !!python/object:os.system ls\n",
    "- a\n- [b, {c: d}]\n- {e: [f, g]}\n",
    "a: |\n  text\n  block\nb: >\n  folded\n  text\n",
    "a: \"\\u00e9\\t\"\nb: 'it''s'\n",
    "? a\n",  # a key without a value
    "a:\n",
    # Several problems: the first found must be the one PyYAML finds (red-team helper-12).
    "a: 2026-02-30\na: 1\n",  # a mapping's duplicate keys before any of its values
    "2026-02-30: 2026-02-31\n",  # a key before its value
    "a: [2026-02-30]\nb: [2026-02-31]\n",  # containers in document order
    "b: {d: !custom x}\nc: {x: 1, x: 2}\n",
    "a: {b: {c: 2026-02-30}}\nd: [2026-02-31]\n",  # level by level
    "b: {d: !custom x}\nc: [2026-02-30]\nr: &r [*r]\n",
]


@pytest.mark.parametrize("text", EDGES)
def test_edge_cases_load_the_same(text: str) -> None:
    same(text)


def test_an_alias_is_the_same_object_as_its_anchor() -> None:
    for loader in (policyfile._Loader, Reference):
        doc = yaml.load("a: &x [1, 2]\nb: *x\nc: &m {k: *m}\n", Loader=loader)
        assert doc["a"] is doc["b"] and doc["c"]["k"] is doc["c"]


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.sampled_from(["yes", "no", "on", "off", "~", "null", "1:30", "0o17", "0x1F", "1_000", ".inf",
                     "2026-01-01", "1e3", "+1", "", " lead", "a: b", "- x", "#c", "&a", "*a", "!t"]),
    st.text(max_size=12), st.dates(), st.datetimes(timezones=st.just(datetime.UTC)),
)  # fmt: skip
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans()), inner, max_size=5),
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(doc=documents, flow=st.sampled_from([None, True, False]), share=st.booleans())
def test_generated_documents_load_the_same(doc: Any, flow: bool | None, share: bool) -> None:
    data = [doc, doc] if share else doc  # the same object twice: the dumper writes an anchor and an alias
    text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    same(text)


def test_a_duplicate_key_is_still_reported_with_its_place() -> None:
    text = example_policy_text().replace("realm: bank\n", "realm: bank\nrealm: other\n", 1)
    with pytest.raises(PolicyError) as e:
        parse_text(text, "p.yaml")
    line = text[: text.index("realm: other")].count("\n") + 1
    assert [str(p) for p in e.value.problems] == [f"p.yaml:{line}:1: realm: duplicate key"]


def test_a_problem_in_a_document_that_refers_to_itself_is_located_at_once() -> None:
    """Locating a problem walks the nodes: an alias to an ancestor is walked once (it looped,
    growing paths until memory ran out)."""
    import time

    t0 = time.monotonic()
    with pytest.raises(PolicyError) as e:
        parse_text("c: [2026-02-30]\nr: &r [*r]\n", "p.yaml")
    assert time.monotonic() - t0 < 5
    assert [str(p) for p in e.value.problems] == [
        "p.yaml:1:5: c[0]: '2026-02-30' is not a date or time (day is out of range for month)"
    ]


def test_the_first_problem_of_a_policy_is_the_one_pyyaml_finds() -> None:
    """A duplicate key in the first permission and an impossible date in the last: the duplicate
    is reported, as before the loader built documents itself (helper-12 found the date)."""
    text = example_policy_text()
    assert "  - id: tellers-read\n" in text
    bad = text.replace("  - id: tellers-read\n", "  - id: tellers-read\n    id: again\n", 1)
    assert "  - id: admins\n" in bad
    bad = bad.replace("  - id: admins\n", "  - id: admins\n    note: 2026-02-30\n", 1)
    line = bad[: bad.index("    id: again")].count("\n") + 1
    with pytest.raises(PolicyError) as e:
        parse_text(bad, "p.yaml")
    assert [str(p) for p in e.value.problems] == [f"p.yaml:{line}:5: permissions[0].id: duplicate key"]
