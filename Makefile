# The two commands: `make run` serves the example policy; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LISTEN ?= 127.0.0.1:9191

.PHONY: run test lint proto proto-check bench demo clean

# The test extra's xds-protos (to regenerate sidecar/_proto; not a run-time dependency) ships an old
# copy of opentelemetry/proto/* over opentelemetry-proto's files: the last install line puts the
# real ones back in this development venv. A plain `pip install` of the wheel never has xds-protos
# (tests/test_plain_install.py).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --force-reinstall --no-deps -c constraints.txt opentelemetry-proto
	touch $(STAMP)

## Serve the bundled example policy and development keys on $(LISTEN).
run: $(STAMP)
	$(BIN)/stepup-sidecar serve --policy examples/policy.yaml --listen $(LISTEN)

## Everything CI checks: generated code fresh, lint, types, the whole test suite.
test: $(STAMP) proto-check lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests scripts bench examples
	$(BIN)/mypy sidecar

## Regenerate sidecar/_proto from proto/ (the one documented command).
proto: $(STAMP)
	$(BIN)/python scripts/genproto.py

proto-check: $(STAMP)
	$(BIN)/python scripts/genproto.py --check

## The step-up story through a real Envoy (sidecar, Envoy and the bank on free loopback ports).
demo: $(STAMP)
	$(BIN)/python examples/demo.py

## Every goal of the perf issue as one table, each marked met or missed (bench/run.py; installs
## h2load when missing). BENCH_ARGS=--quick for a short run.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## Coverage-guided fuzzing of the in-process Check path (atheris; not part of `make test`).
## FUZZ_SECONDS bounds the run; FUZZ_ARGS adds libFuzzer flags (e.g. -seed=1). The working corpus
## stays in .fuzz/corpus, seeds are rebuilt each run; findings go to .fuzz/crashers/ (replay and
## shrink them with `$(BIN)/python -m tests.fuzz.triage --minimize DIR`).
.PHONY: fuzz
FUZZ_SECONDS ?= 60
FUZZ_ARGS ?=
fuzz: $(STAMP)
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install -q -c constraints.txt atheris
	$(BIN)/python -m tests.fuzz.make_seeds .fuzz/seeds
	mkdir -p .fuzz/corpus .fuzz/crashers
	$(BIN)/python -m tests.fuzz.fuzz_check -max_total_time=$(FUZZ_SECONDS) -timeout=10 -max_len=65536 \
		-artifact_prefix=.fuzz/crashers/ -print_final_stats=1 $(FUZZ_ARGS) .fuzz/corpus .fuzz/seeds
	@n=$$(ls .fuzz/crashers | grep -vc '\.txt$$'); echo "fuzz: $$n input(s) in .fuzz/crashers/ (group them: $(BIN)/python -m tests.fuzz.triage)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
