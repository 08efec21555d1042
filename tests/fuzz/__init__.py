"""Coverage-guided fuzzing of the whole in-process Check path (`make fuzz`, atheris).

- `generate.py`   the structure-aware input generator and mutator (a `random.Random` drives it);
- `harness.py`    the target (servicer, policies, reference) and the invariants every answer keeps;
- `fuzz_check.py` the atheris entry point (the only module that needs atheris);
- `make_seeds.py` writes the seed corpus (serialized CheckRequests) into `.fuzz/seeds/`;
- `triage.py`     replays what the fuzzer saved, groups it by kind, shrinks one input per kind into
  a regression file for tests/data/fuzz_regressions/.

Every module but `fuzz_check.py` imports without atheris: `tests/test_fuzz_regressions.py` uses them.
"""
