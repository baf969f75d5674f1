# hakeeper developer tasks.  `make test` is what CI runs (through .ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV := .venv
BIN := $(VENV)/bin
# Directories that exist in this checkout (empty ones are not tracked by git).
LINT_DIRS := $(wildcard hakeeper tests bench chaos)
# pytest exits 5 when it collected no tests: not a failure here.
PYTEST_NO_TESTS_OK := rc=$$?; if [ $$rc -eq 5 ]; then echo "(no tests collected)"; rc=0; fi; exit $$rc

.PHONY: setup bench-setup demo test unit integration integration-15 integration-17 integration-18 chaos-smoke chaos \
	lint typecheck clean

# The version matrix (docs/testing.md): the whole integration suite and chaos smoke run on 15
# (Debian's), the tests marked `matrix` and two chaos scenarios also on each of these majors.
MATRIX_MAJORS := 17 18
MATRIX_CHAOS := kill-both,partition-all
PYTEST_MATRIX := $(BIN)/pytest -p no:cacheprovider tests/integration -m "integration and matrix"

setup:
	scripts/setup.sh

# What the benchmarks (bench/) run beside hakeeper: pgBackRest 2.45 and wrk (Debian packages).
bench-setup:
	EXTRA_PACKAGES="pgbackrest wrk" scripts/setup.sh

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
# The 17 and 18 subsets run even when an earlier run failed (CI shows every failure at once);
# the target fails if any of them failed.
integration:
	@rc=0; \
	echo "== PostgreSQL 15: the whole integration suite =="; \
	TEST_PG_VERSION=15 $(BIN)/pytest tests/integration -m integration || rc=1; \
	for v in $(MATRIX_MAJORS); do \
		echo "== PostgreSQL $$v matrix subset (-m 'integration and matrix') =="; \
		TEST_PG_VERSION=$$v $(PYTEST_MATRIX) || { echo "== PostgreSQL $$v matrix subset FAILED =="; rc=1; }; \
	done; \
	exit $$rc

# One major's matrix subset (what `make integration` runs after the 15 suite).
integration-15 integration-17 integration-18: integration-%:
	@echo "== PostgreSQL $* matrix subset (-m 'integration and matrix') =="
	TEST_PG_VERSION=$* $(PYTEST_MATRIX)

# A handful of fault scenarios, one run each, in sync mode (a few minutes; part of `make test`):
# all of them on 15, then kill-both and partition-all on each major of the matrix.
chaos-smoke:
	@rc=0; stamp=$$(date -u +%Y%m%dT%H%M%SZ); \
	echo "== PostgreSQL 15: chaos smoke =="; \
	$(BIN)/python -m chaos smoke --pg-version 15 --out chaos/reports/smoke-$$stamp || { echo "== PostgreSQL 15 chaos smoke FAILED =="; rc=1; }; \
	for v in $(MATRIX_MAJORS); do \
		echo "== PostgreSQL $$v: chaos smoke subset ($(MATRIX_CHAOS)) =="; \
		$(BIN)/python -m chaos smoke --pg-version $$v --scenarios $(MATRIX_CHAOS) \
			--out chaos/reports/smoke-$$stamp-pg$$v || { echo "== PostgreSQL $$v chaos subset FAILED =="; rc=1; }; \
	done; \
	if [ $$rc -ne 0 ]; then \
		echo "== chaos smoke: what failed =="; \
		$(BIN)/python -m chaos summarize --failures chaos/reports/smoke-$$stamp chaos/reports/smoke-$$stamp-pg*; \
	fi; \
	exit $$rc

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
