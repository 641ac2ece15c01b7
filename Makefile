# `make quickstart` and `make test` work on a fresh clone with Python 3.11: they create .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/quickstart

.PHONY: quickstart test test-slow lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

quickstart: install
	$(BIN)/shoal run --config configs/quickstart.yaml --workdir $(WORKDIR)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy orchestrator workers strategies

test: lint
	$(BIN)/pytest -q

test-slow: install   # the tests marked slow (fault chains, 2-worker restarts); CI runs them after `make test`
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) runs
