"""atheris harness: coverage-guided fuzzing of the whole in-process Check path.

    .venv/bin/python -m tests.fuzz.fuzz_check [libFuzzer flags] CORPUS_DIR [SEED_DIR...]

(`make fuzz` runs it with seeds from make_seeds.py, a time bound and .fuzz/crashers/.)

Every input is the bytes of a serialized `envoy.service.auth.v3.CheckRequest`, given to
`AuthorizationServicer.check_bytes` under each fuzzed policy; `harness.Target.check` asserts the
invariants. The custom mutator mutates raw bytes half the time (libFuzzer's own mutations: most
no longer parse, which exercises the `malformed_request` path and protobuf's decoder) and parses
the request and changes it field by field the other half (`generate.mutate`: methods, paths,
header forms, tokens re-signed with the development key after their payload changed, principals,
sources, context extensions, jwt_authn metadata). The crossover splices fields of two requests.

Environment:
- FUZZ_KEEP_GOING=1 (default): an invariant violation is saved to FUZZ_CRASH_DIR
  (`violation-<kind>-<input>`, at most 5 inputs per kind) and fuzzing goes on, so one run reports
  every kind it finds; 0: it is raised, libFuzzer stops and writes its own crash artifact
  (`-artifact_prefix`), which `-minimize_crash=1` can then shrink.
- FUZZ_CRASH_DIR (.fuzz/crashers), FUZZ_TRIAGE_LOG (.fuzz/disagreements.jsonl: disagreements
  with the reference that are not failures).
- FUZZ_INSTRUMENT: modules whose coverage guides the fuzzer (default "sidecar,joserfc").
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

PER_KIND = 5


class Fuzzer:
    """The callbacks atheris drives; `mutate`/`cross` need `atheris.Mutate` for the raw half."""

    def __init__(self, harness: Any, generate: Any, raw_mutate: Any) -> None:
        self.h = harness
        self.g = generate
        self.raw_mutate = raw_mutate
        self.keep_going = os.environ.get("FUZZ_KEEP_GOING", "1") != "0"
        self.crash_dir = Path(os.environ.get("FUZZ_CRASH_DIR", ROOT / ".fuzz" / "crashers"))
        triage = Path(os.environ.get("FUZZ_TRIAGE_LOG", harness.DEFAULT_TRIAGE_LOG))
        self.target = harness.Target(triage_log=triage, quiet=True)
        self.kinds: dict[str, int] = {}
        if not self.target.reference_enabled:
            print(f"fuzz: reference check OFF ({self.target.reference_problem})", file=sys.stderr)

    def test_one_input(self, data: bytes) -> None:
        try:
            self.target.check(data)
        except self.h.Violation as v:
            if not self.keep_going:
                raise
            self._save(v, data)

    def _save(self, v: Any, data: bytes) -> None:
        kind = hashlib.sha1(v.signature.encode()).hexdigest()[:8]
        n = self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if n == 1:
            print(f"\nfuzz: NEW FINDING {kind}: {v.signature}", file=sys.stderr, flush=True)
        if n > PER_KIND:
            return
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        name = f"violation-{kind}-{hashlib.sha1(data).hexdigest()[:12]}"
        (self.crash_dir / name).write_bytes(data)
        (self.crash_dir / f"{name}.txt").write_text(f"{v.signature}\n\n{v}\n")

    def mutate(self, data: bytes, max_size: int, seed: int) -> bytes:
        r = random.Random(seed)
        if r.random() < 0.5:
            out: bytes = self.raw_mutate(data, max_size)
            return out
        req = self.h.parse_request(data)
        req = self.g.generate(r) if req is None else self.g.mutate(r, req)
        out = req.SerializeToString()
        return out if len(out) <= max_size else self.raw_mutate(data, max_size)

    def cross(self, data1: bytes, data2: bytes, max_size: int, seed: int) -> bytes:
        r = random.Random(seed)
        a, b = self.h.parse_request(data1), self.h.parse_request(data2)
        if a is None or b is None:
            cut1, cut2 = r.randrange(len(data1) + 1), r.randrange(len(data2) + 1)
            return (data1[:cut1] + data2[cut2:])[:max_size]
        out: bytes = self.g.crossover(r, a, b).SerializeToString()
        return out if len(out) <= max_size else data1[:max_size]


def main() -> None:
    import atheris

    include = [m for m in os.environ.get("FUZZ_INSTRUMENT", "sidecar,joserfc").split(",") if m]
    with atheris.instrument_imports(include=include):
        import sidecar.attributes
        import sidecar.engine
        import sidecar.identity
        import sidecar.paths
        import sidecar.policy
        import sidecar.response
        import sidecar.risk
        import sidecar.server
        import sidecar.telemetry  # noqa: F401
    from tests.fuzz import generate, harness

    # atheris.Mutate is looked up on each call: Setup() swaps in the libFuzzer-backed one.
    fuzzer = Fuzzer(harness, generate, lambda data, max_size: atheris.Mutate(data, max_size))
    atheris.Setup(
        sys.argv,
        fuzzer.test_one_input,
        custom_mutator=fuzzer.mutate,
        custom_crossover=fuzzer.cross,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
