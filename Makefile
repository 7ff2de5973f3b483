# The two set-up commands of the README: `make demo` (main job) and `make test` (the test suite).
# Each creates/refreshes .venv on first use.
VENV ?= .venv

.PHONY: setup demo test test-fast lint

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/gisp demo

test: setup
	$(VENV)/bin/python -m ruff check src tests scripts
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not integration"

lint: setup
	$(VENV)/bin/python -m ruff check src tests scripts
	$(VENV)/bin/lint-imports --no-cache
