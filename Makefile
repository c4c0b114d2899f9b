# Everything a fresh clone needs: `make demo` and `make test` create the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test
PYTEST_ARGS ?=

.PHONY: install test test-sqlite test-postgres lint coverage demo serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,example]'
	touch $@

install: $(VENV)/.installed

# The whole gate: lint, the suite on SQLite and on PostgreSQL (coverage combined), the example.
test: install
	rm -f .coverage .coverage.*
	$(MAKE) lint
	$(MAKE) test-sqlite
	$(MAKE) test-postgres
	$(MAKE) coverage

# Warnings are errors (pyproject) and PYTHONDEVMODE reports leaked sockets, files and threads.
RUN_TESTS := PYTHONDEVMODE=1 $(BIN)/python -m coverage run -m pytest $(PYTEST_ARGS)

test-sqlite: install
	env -u DATABASE_URL $(RUN_TESTS)

test-postgres: install
	DATABASE_URL=$(POSTGRES_URL) $(RUN_TESTS)

coverage: install
	$(BIN)/python -m coverage combine --quiet
	$(BIN)/python -m coverage report --fail-under=90

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=. $(BIN)/mypy django_workitems tests
	PYTHONPATH=. DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python -m django makemigrations --check --dry-run

demo: install
	$(MAKE) -C example_project demo PYTHON=$(abspath $(BIN))/python

serve: install
	$(MAKE) -C example_project serve PYTHON=$(abspath $(BIN))/python

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache *.egg-info
