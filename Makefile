# hakeeper developer tasks.  `make test` is what CI runs (through .ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV := .venv
BIN := $(VENV)/bin
# Directories that exist in this checkout (empty ones are not tracked by git).
LINT_DIRS := $(wildcard hakeeper tests bench chaos)
# pytest exits 5 when it collected no tests: not a failure here.
PYTEST_NO_TESTS_OK := rc=$$?; if [ $$rc -eq 5 ]; then echo "(no tests collected)"; rc=0; fi; exit $$rc

.PHONY: setup demo test unit integration chaos-smoke chaos lint typecheck clean

setup:
	scripts/setup.sh

demo: setup
	$(BIN)/hakeeper demo

test: setup
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory unit
	$(MAKE) --no-print-directory integration
	$(MAKE) --no-print-directory chaos-smoke

lint:
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/lint-imports --no-logo

typecheck:
	$(BIN)/mypy hakeeper chaos tests

unit:
	$(BIN)/pytest tests/unit || { $(PYTEST_NO_TESTS_OK); }

# Every test under tests/integration must carry the marker (tests/integration/conftest.py fails the
# run otherwise), and "no tests collected" (exit 5) is a failure here: nothing may be skipped silently.
integration:
	$(BIN)/pytest tests/integration -m integration

# A handful of fault scenarios, one run each, in sync mode (a few minutes; part of `make test`).
chaos-smoke:
	$(BIN)/python -m chaos smoke --out chaos/reports/smoke-$$(date -u +%Y%m%dT%H%M%SZ)

# Every scenario in every replication mode, CHAOS_RUNS runs each (about an hour with 3), then
# the summary in docs/chaos.md is rewritten from the reports.
CHAOS_RUNS ?= 3
chaos: setup
	rm -rf chaos/reports/full
	rc=0; $(BIN)/python -m chaos full --runs $(CHAOS_RUNS) --out chaos/reports/full || rc=$$?; \
	$(BIN)/python -m chaos summarize chaos/reports/full --write docs/chaos.md; exit $$rc

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
