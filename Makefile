# `make test` builds the environment from nothing, lints and runs the whole suite;
# `make test-fast` runs the tests that start no Ray instance (`-m "not ray"`); `make demo` runs the demo.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast lint demo venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not ray"

demo: $(STAMP)
	$(VENV)/bin/raytrain demo

clean:
	rm -rf $(VENV) runs .pytest_cache
