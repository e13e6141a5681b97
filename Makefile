# The README's commands. `make test` and `make demo` work on a fresh clone: they run setup first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

# torch is pinned and installed first: the CPU wheel on this machine, not a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,export,semantic]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/distill run pipelines/demo.yaml

bench: setup
	$(PY) benchmarks/teacher_throughput.py --requests 3000 --concurrency 64
	$(PY) benchmarks/dedup.py
	$(PY) benchmarks/teacher_workers.py -n 2000

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
