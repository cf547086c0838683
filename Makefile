# Make targets for what people do. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)
STAMP := $(VENV)/.intl_kernels-installed

.PHONY: install test test-torch test-cuda gpu-check compile-check compile-check-full compile-budget sass-report demo bench bench-gpu lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=64" wheel

# Re-runs only when the build inputs change; the extension build is incremental (ninja).
$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet ninja
	$(PIP) install --no-build-isolation -e ".[test,bench,train,dali]"
	touch $(STAMP)

install: $(STAMP)

# Tests run on TEST_WORKERS processes (pytest-xdist), one torch thread each: the suite is mostly
# single-threaded Python (Triton's interpreter, subprocesses that compile), so two workers on two
# cores cut its time by a third (322 -> 217 s measured), and one thread per worker keeps them
# from oversubscribing the cores.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal tests

# The CPU suite and the gpu-check dry run against another torch release, in a side environment
# .venv-torch-$(TORCH) with that torch and its Triton (tools/test_torch.py; results in
# docs/versions.md). CI runs `make test` on the pinned torch only.
TORCH ?=
test-torch:
	@test -n "$(TORCH)" || { echo "make test-torch: set TORCH, e.g. make test-torch TORCH=2.11.0"; exit 2; }
	$(PYTHON) tools/test_torch.py $(TORCH)

# On a GPU machine (the venv if there is one, else python3 with torch, triton and pytest; no
# network needed): builds the extension in place for this GPU only, then the GPU tests.
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_ARCH = $$($(GPU_PY) -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")

test-cuda:
	INTL_KERNELS_CUDA_ARCHS=$(GPU_ARCH) $(GPU_PY) setup.py build_ext --inplace
	$(GPU_PY) -m pytest -m cuda tests

# On a GPU machine, the one command (python3 with torch, triton, pytest; no network, installs
# nothing), within GPU_CHECK_BUDGET seconds: environment facts, build for this GPU, warm-up
# compile, smoke (small r, every precision mode, goal shapes), compute-sanitizer, goals, GPU
# suite (never-GPU-run tests first); results in GPU_CHECK_DIR (summary.json, summary.md, log,
# JUnit XML, smoke and sanitizer tables, bench files). verify/gpu_check.py: the time shares.
GPU_CHECK_DIR ?= gpu-check
GPU_CHECK_BUDGET ?= 540
gpu-check:
	$(GPU_PY) -m verify.gpu_check --out $(GPU_CHECK_DIR) --budget $(GPU_CHECK_BUDGET)

# Resource gate: every kept Triton launch config compiled for sm_80 and sm_90 (shared memory
# within the limit, no spill above 16 B); no GPU needed. `make test` runs it (tests/test_triton_compile.py).
compile-check: install
	$(PY) -m intl_kernels.triton.compile_check

# The full sweep: every distinct variant (every r = 1..144, each layout's specialization, T = 2
# and 5), 4329 compiles, 8-17 minutes on 2 cores with a cold cache; writes
# bench/results/compile-check-full-triton<version>.{json,md}. For another Triton (the GPU
# machine's 3.6): pip install --target DIR --no-deps triton==3.6.0, then PYTHONPATH=DIR make ...
compile-check-full: install
	$(PY) -m intl_kernels.triton.compile_check --full --report bench/results

# Compile budget of a first GPU run of the goal points, counted and compiled here:
# bench/results/compile-budget-sm90.json.
compile-budget: install
	$(PY) -m verify.compile_budget --compile

# What the streaming kernels of both GPU backends issue, from their sm_90 SASS, and the layer's
# predicted time (no GPU; needs cuobjdump): bench/results/sass-report-{cuda,triton}-after.*.
sass-report: install
	$(PY) -m verify.sass_report

demo: install
	$(PY) -m intl_kernels.demo
	$(PY) -m train.demo

# CPU benchmark, small grid (a few minutes on 2 cores): CSV, goals JSON, table and plots in bench/results/.
bench: install
	$(PY) -m bench.run_cpu

# On a GPU machine (the venv if there is one, else python3 with torch + triton; no network needed):
# builds the extension in place for this GPU, runs the full grid (goals P1-P4) and the training
# step (P5); CSVs, goals JSON, table and plots in bench/results/.
bench-gpu:
	INTL_KERNELS_CUDA_ARCHS=$(GPU_ARCH) $(GPU_PY) setup.py build_ext --inplace \
		|| echo "bench-gpu: the extension did not build; benchmarking without the cpu/cuda backends"
	$(GPU_PY) -m bench.run_gpu
	$(GPU_PY) -m bench.train_step

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build *.egg-info intl_kernels/_C*.so $(STAMP)
