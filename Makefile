# hakeeper developer tasks.  `make test` is what CI runs (through .ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV := .venv
BIN := $(VENV)/bin
# Directories that exist in this checkout (empty ones are not tracked by git).
LINT_DIRS := $(wildcard hakeeper tests bench chaos)
# pytest exits 5 when it collected no tests: not a failure here.
PYTEST_NO_TESTS_OK := rc=$$?; if [ $$rc -eq 5 ]; then echo "(no tests collected)"; rc=0; fi; exit $$rc

.PHONY: setup demo test unit integration lint typecheck clean

setup:
	scripts/setup.sh

demo: setup
	$(BIN)/hakeeper demo

test: setup
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory unit
	$(MAKE) --no-print-directory integration

lint:
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck:
	$(BIN)/mypy hakeeper

unit:
	$(BIN)/pytest tests/unit || { $(PYTEST_NO_TESTS_OK); }

integration:
	$(BIN)/pytest tests/integration -m integration || { $(PYTEST_NO_TESTS_OK); }

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
