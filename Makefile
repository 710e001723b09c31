# `make test` builds the environment from nothing and runs the suite; `make demo` runs the demo.
# `make bench-gpu` runs the GPU check with the machine's own python3 (BENCHMARKS.md "GPU").
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

BENCH_GPU_OUT ?= runs/bench_gpu.json

.PHONY: test demo venv clean bench-gpu

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/raytrain demo

bench-gpu:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m raytrain.cli bench gpu --json --out $(BENCH_GPU_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache
