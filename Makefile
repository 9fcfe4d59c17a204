# tskd: make demo | make test | make reproduce PROFILE=... DATASET=... | make lab
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= demo
DATASET ?= phantom
DATA_ROOT ?= data
N_LABELED ?= 20
SEEDS ?= 0
SEED ?= 0
RUNS ?= runs/$(DATASET)-$(PROFILE)
METHODS ?= all
EXECUTOR ?= local

.PHONY: install lock demo test test-fast test-notebooks reproduce lab clean-cache clean-runs help

help:
	@echo "make demo        [SEED=0] the whole pipeline on the embedded phantom (CPU, offline; see README for the time)"
	@echo "make test        install if needed and run the test suite (offline, CPU), the nbval notebook runs included"
	@echo "make test-notebooks  only the notebooks, as a reader runs them (nbval, smoke profile from TSKD_* variables)"
	@echo "make reproduce   PROFILE=demo DATASET=hc18 N_LABELED=10,20,50 SEEDS=0,1,2 [DATA_ROOT=data] [EXECUTOR=ray]"
	@echo "make lab         start JupyterLab on notebooks/"
	@echo "make clean-cache remove the recomputable caches under runs/ (keeps weights, metrics, notebooks)"

# a virtual environment with the project installed (re-done when pyproject.toml changes)
# EXTRAS: the optional dependencies (pyproject.toml); Ray and submitit (cluster) and SimpleITK (psfhs) only where
# asked for: `make test` asks for them on a fresh .venv so that the cluster and .mha tests run;
# `make -B install EXTRAS=dev,cluster` adds them to an existing .venv (a plain `make install` sees the stamp and
# does nothing)
EXTRAS ?= dev
# CPU=1: PyTorch's CPU-only torch and torchvision (timm needs it) first (no CUDA libraries: a laptop, Binder),
# then the project, which keeps them
CPU ?= 0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# PINNED=1 (the default on Linux x86-64): every package at its version in $(LOCK), used as pip constraints;
# PINNED=0 (the default elsewhere): the newest releases within pyproject.toml's ranges
LOCK ?= requirements/lock-linux-x86_64.txt
PINNED ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),1,0)
PIN := $(if $(filter 1,$(PINNED)),-c $(LOCK))
# pip byte-compiles what it installs: keep it. --no-compile made the fresh-clone `make test` about 4 minutes slower
# where PYTHONDONTWRITEBYTECODE is set (docs/benchmarks.md, "pip --no-compile, tried")
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ "$(CPU)" = 1 ]; then $(PY) -m pip install -q "torch>=2.6" torchvision $(PIN) --index-url $(TORCH_CPU_INDEX); fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(PIN)
	touch $(STAMP)

# the lock file from pyproject.toml (its header says how it is used)
lock: $(STAMP)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra cluster --extra lab --extra psfhs --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -c requirements/torch-pin.txt --no-header -o $(LOCK).new
	{ sed -n '/^#/p;/^[^#]/q' $(LOCK); cat $(LOCK).new; } > $(LOCK).tmp && rm $(LOCK).new && mv $(LOCK).tmp $(LOCK)

install: $(STAMP)

# the test files on TEST_WORKERS processes (pytest-xdist; each file stays in one process, in order: its module
# fixtures are built once), handed out longest first (tests/conftest.py, LONGEST_FIRST; --no-loadscope-reorder keeps
# that order); TEST_WORKERS=0 runs them in this process, one after the other
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: EXTRAS = dev,cluster,psfhs
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

# everything that trains nothing (no stage's epoch runs: tests/conftest.py refuses one in a test not marked `trains`)
test-fast: $(STAMP)
	TSKD_TEST_NO_TRAINING=1 $(PY) -m pytest -q $(XDIST) -m "not slow and not trains"

# nbval, smoke profile through TSKD_PROFILE/TSKD_DATA_ROOT/TSKD_RUN_DIR only, temporary folders, CPU: all five
# notebooks in order, then 04 and 05 each alone on an empty run folder (tests/test_notebooks_alone.py; make test runs it too)
test-notebooks: $(STAMP)
	$(PY) -m pytest -q tests/test_notebooks_alone.py

demo: $(STAMP)
	$(PY) -m tskd_utils.reproduce --profile demo --dataset phantom --data-root $(DATA_ROOT) \
		--n-labeled 20 --seeds $(SEED) --out runs/demo

reproduce: $(STAMP)
	$(PY) -m tskd_utils.reproduce --profile $(PROFILE) --dataset $(DATASET) --data-root $(DATA_ROOT) \
		--n-labeled $(N_LABELED) --seeds $(SEEDS) --methods $(METHODS) --executor $(EXECUTOR) --out $(RUNS)

lab: $(STAMP)
	$(PY) -m pip install -q -e ".[lab]"
	$(VENV)/bin/jupyter lab notebooks/

# what the runs can recompute on demand: the teacher's cached prefix features (runs/<sweep>/_shared_cache) and each
# run's cache/ (teacher targets, synthetic-image features); weights, metrics, figures and notebooks stay
clean-cache:
	@if [ -d runs ]; then du -sh runs; find runs -maxdepth 3 -type d \( -name _shared_cache -o -name cache \) -prune \
		-exec rm -rf {} +; du -sh runs; fi

clean-runs:
	rm -rf runs/
