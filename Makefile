# The two commands: `make run` serves the example policy; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LISTEN ?= 127.0.0.1:9191

.PHONY: run test lint proto proto-check bench demo clean

# xds-protos ships an old copy of opentelemetry/proto/* over opentelemetry-proto's files, which
# breaks the OTLP exporter: the last install line puts the real ones back (tests/test_telemetry.py).
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

bench: $(STAMP)
	$(BIN)/python bench/decide.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
