# `make test` builds the environment from nothing, lints and runs the whole suite (two
# pytest-xdist workers: the Ray tests in one, one after another, the rest beside them);
# `make test-fast` leaves out the tests that start Ray or take seconds (`-m "not ray and not slow"`);
# `make demo` runs the demo.
# `make bench-gpu` runs the GPU check with the machine's own python3 (BENCHMARKS.md "GPU").
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

BENCH_GPU_OUT ?= runs/bench_gpu.json

.PHONY: test test-fast lint demo venv clean bench-gpu

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test-fast: lint
	$(PY) -m pytest -q -n 2 -m "not ray and not slow"

demo: $(STAMP)
	$(VENV)/bin/raytrain demo

bench-gpu:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m raytrain.cli bench gpu --json --out $(BENCH_GPU_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache
