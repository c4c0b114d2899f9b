# Everything a fresh clone needs: `make demo` and `make test` create the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test
PYTEST_ARGS ?=

.PHONY: install test test-sqlite test-postgres test-example lint docs coverage demo serve clean bench bench-quick

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,example]'
	touch $@

install: $(VENV)/.installed

# The whole gate: lint, the docs build, the suite on SQLite and on PostgreSQL (coverage
# combined), the example project's tests on both, and a smoke run of the benchmarks (no speed
# asserted).
test: install
	rm -f .coverage .coverage.*
	$(MAKE) lint
	$(MAKE) docs
	$(MAKE) test-sqlite
	$(MAKE) test-postgres
	$(MAKE) coverage
	$(MAKE) test-example
	$(MAKE) bench-quick

# Warnings are errors (pyproject) and PYTHONDEVMODE reports leaked sockets, files and threads.
RUN_TESTS := PYTHONDEVMODE=1 $(BIN)/python -m coverage run -m pytest $(PYTEST_ARGS)

test-sqlite: install
	env -u DATABASE_URL $(RUN_TESTS)

test-postgres: install
	DATABASE_URL=$(POSTGRES_URL) $(RUN_TESTS)

test-example: install
	env -u DATABASE_URL PYTHONDEVMODE=1 $(MAKE) -C example_project test PYTHON=$(abspath $(BIN))/python
	DATABASE_URL=$(POSTGRES_URL) PYTHONDEVMODE=1 $(MAKE) -C example_project test PYTHON=$(abspath $(BIN))/python

coverage: install
	$(BIN)/python -m coverage combine --quiet
	$(BIN)/python -m coverage report --fail-under=90

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=. $(BIN)/mypy django_workitems tests benchmarks
	cd example_project && PYTHONPATH=.:.. ../$(BIN)/mypy catalog example_project demo_shop.py tests
	PYTHONPATH=. DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python -m django makemigrations --check --dry-run
	cd example_project && env -u DATABASE_URL ../$(BIN)/python manage.py makemigrations --check --dry-run

# The documentation site (mkdocs.yml, docs/) into build/site/; any warning fails the build.
docs: install
	$(BIN)/mkdocs build --strict --site-dir build/site

bench: install
	$(BIN)/python -m benchmarks $(ARGS)

bench-quick: install
	$(BIN)/python -m benchmarks --quick $(ARGS)

demo: install
	$(MAKE) -C example_project demo PYTHON=$(abspath $(BIN))/python

serve: install
	$(MAKE) -C example_project serve PYTHON=$(abspath $(BIN))/python

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache *.egg-info
