# Targets shared by people and CI. `make test` and `make demo` work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install system-deps lint typecheck test test-unit test-integration demo dev schemas bench-runtime clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

system-deps:
	./scripts/install-system-deps.sh

# The pinned npm packages that regenerate deploy/grafana/schema/dashboard.schema.json (a test checks it is current).
GRAFANA_SCHEMA := deploy/grafana/schema
$(GRAFANA_SCHEMA)/node_modules/.package-lock.json: $(GRAFANA_SCHEMA)/package-lock.json | system-deps
	cd $(GRAFANA_SCHEMA) && npm ci --no-audit --no-fund --loglevel=error

install: $(BIN)/.installed system-deps $(GRAFANA_SCHEMA)/node_modules/.package-lock.json

lint: install
	$(BIN)/ruff check ocrbooth tests $(wildcard bench)
	$(BIN)/ruff format --check ocrbooth tests $(wildcard bench)

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

test-integration: install
	$(BIN)/pytest tests/integration tests/e2e

demo: install
	$(BIN)/ocrbooth demo

dev: install
	$(BIN)/ocrbooth dev

schemas: install
	$(BIN)/ocrbooth schemas --out ocrbooth/schemas/json

bench-runtime: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/runtime_overhead.py

clean:
	rm -rf $(VENV) .ocrbooth .pytest_cache .mypy_cache .ruff_cache .hypothesis
