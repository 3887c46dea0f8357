# The two entry points of the README. Both set up .venv from scratch when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup build demo test wheel-check bench gpu-check readme-figures

$(VENV)/.deps: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch" "torchvision" "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[train,bench,dev]"
	touch $@

setup: $(VENV)/.deps build

# Rebuild the compiled core (incremental: build/ keeps the CMake tree).
build: $(VENV)/.deps
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m fastassoc --require cpu

demo: setup
	$(VENV)/bin/fastassoc demo

# Rerun the demo and rewrite README's demo table (between its demo-table markers) from that run.
readme-figures: setup
	$(PY) scripts/readme_figures.py

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# The platform wheel (from build/'s tree, C++ objects reused), checked for its core, LICENSE
# and py.typed and run outside the checkout. WHEEL_CUDA_ARCHITECTURES=dev reuses the CUDA
# objects too (CI); the default, release, compiles them for sm_80/86/89/90 + PTX.
# The no-compiler install is covered by tests/test_build.py.
WHEEL_CUDA_ARCHITECTURES ?= release
wheel-check: $(VENV)/.deps
	PY=$(PY) WHEEL_CUDA_ARCHITECTURES=$(WHEEL_CUDA_ARCHITECTURES) bash .ci/wheel_check.sh

bench: setup
	$(PY) -m pytest -q bench --benchmark-only

# On a CUDA machine (no package index needed): build, CUDA tests, GPU benchmarks, one summary
# (summary.json + summary.md) under GPU_CHECK_OUT. Each stage has its own timeout; see bench/gpu_check.sh.
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),gpu-check-results)
gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_OUT)
