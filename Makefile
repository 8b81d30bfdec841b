# Developer and CI entry points. `make help` lists the targets.
#
# The virtualenv is built from the hashed lock files only; stamps inside .venv
# make reruns a no-op until a lock file changes.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
PIP_INSTALL := $(PIP) install --require-hashes

PORT        ?= 8000
MOCK_PORT   ?= 9100
PYTEST_ARGS ?=
# Extra pip-compile flags, e.g. `make lock LOCK_ARGS=--upgrade`.
LOCK_ARGS   ?=
export PORT MOCK_PORT

PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile \
	--quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

.PHONY: help
help: ## Show this help
	@echo "Usage: make TARGET   (knobs: PORT=$(PORT) MOCK_PORT=$(MOCK_PORT) PYTEST_ARGS='...')"
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'

# --- virtualenv ------------------------------------------------------------

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip itself is upgraded to the hashed pin from the dev lock (pip-tools needs
# it, so it is always there), never to whatever the index serves today.
$(VENV)/.pip: requirements-dev.lock | $(PY)
	awk '/^pip==/ {p = 1} p {print} p && !/\\$$/ {exit}' $< > $(VENV)/pip.req
	$(PIP) install --quiet --require-hashes -r $(VENV)/pip.req
	@touch $@

$(VENV)/.installed: requirements.lock $(VENV)/.pip
	$(PIP_INSTALL) -r requirements.lock
	@touch $@

# The dev lock is a superset of the runtime lock, so it satisfies both stamps.
$(VENV)/.installed-dev: requirements-dev.lock $(VENV)/.pip
	$(PIP_INSTALL) -r requirements-dev.lock
	@touch $@ $(VENV)/.installed

.PHONY: install install-dev
install: $(VENV)/.installed ## Create .venv with the runtime dependencies
install-dev: $(VENV)/.installed-dev ## Create .venv with runtime + dev dependencies

# --- everyday targets -------------------------------------------------------

.PHONY: run
run: $(VENV)/.installed ## Run the gateway + mock upstream on http://127.0.0.1:$PORT
	scripts/run.sh

.PHONY: test
test: $(VENV)/.installed-dev ## The import contract, then pytest against private Postgres + Redis
	@# An upward import (pyproject.toml: [tool.importlinter]) fails CI before any test runs.
	$(VENV)/bin/lint-imports
	@# The dashboard's browser tests drive Debian's Chromium (Playwright downloads no browser).
	command -v chromium || (apt-get update && apt-get install -y chromium)
	scripts/services.sh test -- $(PY) -m pytest $(PYTEST_ARGS)

.PHONY: services
services: ## Start Postgres + Redis for development until Ctrl-C
	scripts/services.sh up

.PHONY: lint
lint: $(VENV)/.installed-dev ## ruff, ruff format --check, mypy, lint-imports (runs all, fails if any fails)
	@# The django-stubs plugin imports settings, which insist on SECRET_KEY outside debug.
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	GATEWAY_DEBUG=1 $(VENV)/bin/mypy . || status=1; \
	$(VENV)/bin/lint-imports || status=1; \
	exit $$status

.PHONY: format
format: $(VENV)/.installed-dev ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# --- benchmark -----------------------------------------------------------------

.PHONY: bench
bench: $(VENV)/.installed-dev ## Benchmark against LiteLLM's proxy and a bare nginx mock (README: Performance)
	bench/setup.sh
	scripts/services.sh test -- $(PY) bench/run.py

# --- lock files --------------------------------------------------------------

# Bootstrap pip-tools from the dev lock when there is one.
$(VENV)/bin/pip-compile: | $(PY)
	if [ -f requirements-dev.lock ]; then \
		$(MAKE) $(VENV)/.installed-dev; \
	else \
		$(PIP) install pip-tools==7.6.2; \
	fi

.PHONY: lock
lock: $(VENV)/bin/pip-compile ## Regenerate requirements{,-dev}.lock from pyproject.toml
	$(PIP_COMPILE) --extra dev -o requirements-dev.lock pyproject.toml
	@# Seed the runtime lock with the dev pins so both files agree: pip-compile
	@# keeps the pins it finds in its output file when they still fit.
	cp requirements-dev.lock requirements.lock
	$(PIP_COMPILE) -o requirements.lock pyproject.toml
	@diff_pins=$$(comm -23 \
		<(grep -E '^[A-Za-z0-9]' requirements.lock | cut -d' ' -f1 | sort) \
		<(grep -E '^[A-Za-z0-9]' requirements-dev.lock | cut -d' ' -f1 | sort)); \
	if [ -n "$$diff_pins" ]; then \
		echo "requirements.lock pins differ from requirements-dev.lock: $$diff_pins" >&2; exit 1; \
	fi
	@if grep -qE '^litellm==(1\.82\.[78]|1\.107\.0) ' requirements*.lock; then \
		echo "refusing compromised litellm 1.82.7/1.82.8/1.107.0" >&2; exit 1; \
	fi

# --- housekeeping --------------------------------------------------------------

.PHONY: clean
clean: ## Remove .venv, var/ and caches
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# --- soak ---------------------------------------------------------------------------

.PHONY: soak
soak: $(VENV)/.installed-dev ## The proofs in tests/proofs at soak size: more load, more fuzz examples
	GATEWAY_SOAK=1 scripts/services.sh test -- $(PY) -m pytest tests/proofs $(PYTEST_ARGS)
