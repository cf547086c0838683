# Make targets for what people do. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)
STAMP := $(VENV)/.intl_kernels-installed

.PHONY: install test test-cuda compile-check demo bench bench-gpu lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=64" wheel

# Re-runs only when the build inputs change; the extension build is incremental (ninja).
$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet ninja
	$(PIP) install --no-build-isolation -e ".[test,bench,train]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest tests

test-cuda: install
	$(PY) -m pytest -m cuda tests

# Every Triton kernel variant (all autotuning configs) compiled for sm_80 and sm_90; no GPU needed.
compile-check: install
	$(PY) -m intl_kernels.triton.compile_check

demo: install
	$(PY) -m intl_kernels.demo
	$(PY) -m train.demo

bench: install
	$(PY) -m bench.run_cpu

# On a GPU machine: triton vs the INTL authors' formulation (P1, P2, P4) into bench/results/.
bench-gpu: install
	$(PY) -m bench.run_gpu

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build *.egg-info intl_kernels/_C*.so $(STAMP)
