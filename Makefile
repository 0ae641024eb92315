# `make demo` and `make test` do all set-up on a fresh Debian machine with Python 3.11:
# a virtualenv in .venv, the project and its pinned dependencies, and redis-server.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medkd-installed
JOB ?= examples/quickstart.yaml

.PHONY: demo test test-fast lint setup redis iproute2 haproxy clean-runs help

help:
	@echo "make demo   - set up, then run $(JOB) end to end (teachers, cache, search, export, serve)"
	@echo "make test      - set up, lint, then run the whole test suite (unit, integration and slow tests)"
	@echo "make test-fast - unit tests only (no Ray, redis-server or end-to-end runs): the inner loop, < 2 min"
	@echo "make lint      - ruff check and ruff format --check"

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 not found (need python3.11 or python3 >= 3.11)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: medkd needs Python >= 3.11, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) redis iproute2 haproxy

redis:
	@sh scripts/ensure_redis.sh

iproute2:
	@sh scripts/ensure_iproute2.sh

# Serve's fast path (HAProxy in front of the replicas): medkd serve's default when haproxy is on PATH.
haproxy:
	@sh scripts/ensure_haproxy.sh

demo: setup
	$(BIN)/medkd run $(JOB)

test: setup lint
	$(BIN)/python -m pytest -q --durations=25

# Unit tests only: tests marked slow or integration (tests/conftest.py marks every test that uses a
# real-service fixture) are left out.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-runs:
	rm -rf runs
