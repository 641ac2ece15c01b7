# `make quickstart` and `make test` work on a fresh clone with Python 3.11: they create .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Label Studio for the labeling tests: its own venv, its pins clash with Shoal's (Django, pytz, pyarrow)
LS_VENV := .venv-labelstudio
LABEL_STUDIO := label-studio==1.23.2
WORKDIR ?= runs/quickstart

.PHONY: quickstart test test-slow lint install labeling clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

labeling: $(LS_VENV)/.installed

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet "$(LABEL_STUDIO)"
	touch $@

quickstart: install
	$(BIN)/shoal run --config configs/quickstart.yaml --workdir $(WORKDIR)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy orchestrator workers strategies

test: lint
	$(BIN)/pytest -q

test-slow: install labeling   # the tests marked slow (fault chains, 2-worker restarts, a real Label Studio); CI runs them after `make test`
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) $(LS_VENV) runs
