# make run: start the server with its defaults and the dashboard; make test: lint, type-check and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# Where `make run` serves the dashboard; `make run WEB_ADDRESS=` runs the server alone.
WEB_ADDRESS ?= localhost:8080

.PHONY: run test lint typecheck pytest clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python run_perf_db_server.py $(if $(WEB_ADDRESS),--web-address=$(WEB_ADDRESS)) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check perfdb tests benchmarks run_perf_db_server.py
	$(BIN)/ruff format --check perfdb tests benchmarks run_perf_db_server.py
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: $(STAMP)
	$(BIN)/mypy

# Test files run in parallel, one process per core (pytest-xdist; a file's tests stay together):
# the suite is mostly waiting on servers, sockets and fsyncs. PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= auto
pytest: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info
