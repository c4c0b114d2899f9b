# Everything a fresh clone needs: `make demo` and `make test` create the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test
PYTEST_ARGS ?=

.PHONY: install test test-sqlite test-postgres lint demo serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,example]'
	touch $@

install: $(VENV)/.installed

test: install
	$(MAKE) test-sqlite
	$(MAKE) test-postgres

test-sqlite: install
	DATABASE_URL= $(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: install
	DATABASE_URL=$(POSTGRES_URL) $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(MAKE) -C example_project demo PYTHON=$(abspath $(BIN))/python

serve: install
	$(MAKE) -C example_project serve PYTHON=$(abspath $(BIN))/python

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache *.egg-info
