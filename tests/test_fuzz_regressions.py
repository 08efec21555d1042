"""What the Check fuzzer (tests/fuzz/, `make fuzz`) found stays fixed, and its invariants hold.

- Every file in tests/data/fuzz_regressions/ is an input the fuzzer found (minimised): replayed
  through the in-process servicer under both fuzzed policies, it must keep every invariant of
  `tests.fuzz.harness` (no escaping exception, no internal error, a well-formed answer, identity
  headers overwritten or removed on allow, nothing allowed that the reference denies).
- The fuzzer's structured input generator, driven by a seeded `random.Random` instead of atheris,
  makes 2,000 requests that must keep the same invariants. Needs no atheris.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.generate import generate, mutate
from tests.fuzz.harness import Target, Violation, load_regression

REGRESSIONS = sorted((Path(__file__).parent / "data" / "fuzz_regressions").glob("*.json"))
GENERATED = 2000


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_fuzz_regression(target: Target, path: Path) -> None:
    """A minimised fuzzer finding (its `why` says what it broke) keeps every invariant."""
    why = json.loads(path.read_text())["why"]
    try:
        target.check(load_regression(path))
    except Violation as v:
        pytest.fail(f"{path.name} ({why}):\n{v}", pytrace=False)


def test_regression_files_are_well_formed() -> None:
    """Each regression file says why it is there and holds exactly one input form."""
    assert REGRESSIONS, "tests/data/fuzz_regressions/ is empty"
    for path in REGRESSIONS:
        doc = json.loads(path.read_text())
        assert doc.get("why"), path.name
        assert ("request" in doc) != ("base64" in doc), path.name


def test_generated_requests_keep_every_invariant(target: Target) -> None:
    """2,000 requests from the fuzzer's structured generator (half fresh, half mutations of the
    previous one): no internal error, well-formed answers, nothing allowed that the reference
    denies. All violations are collected and reported by kind."""
    r = random.Random(20261202)
    found: dict[str, list[str]] = {}
    prev = None
    for i in range(GENERATED):
        req = generate(r) if prev is None or i % 2 == 0 else mutate(r, prev)
        prev = req
        try:
            target.check(req.SerializeToString())
        except Violation as v:
            found.setdefault(v.signature, []).append(f"input {i}: {str(v)[:1500]}")
    if found:
        report = "\n\n".join(f"[{len(v)}x] {sig}\n  first: {v[0]}" for sig, v in found.items())
        pytest.fail(f"{sum(map(len, found.values()))} of {GENERATED} inputs broke an invariant:\n\n{report}", pytrace=False)
    for seat in target.seats:
        assert seat.metrics.registry.get_sample_value("stepup_internal_errors_total") == 0, seat.name
