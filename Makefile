# Entry points; each sets up .venv from the project's own files on first use and builds
# the fused kernels up front (`make build`), so that no job pays for it inside.
#   make demo   convert the bundled checkpoints, check the round trip, replay upstream's run
#   make test   ruff + the parity gate + the test suite + the CUDA-torch build check (CI)
#   make quick  ruff + the tests not marked slow: the inner loop (docs/development.md)
#   make build  build the fused kernels (cached: a few seconds when nothing changed)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: demo test quick install build build-test check-cuda-torch clean

install: $(STAMP)

# torch is pinned first so that no CUDA build of several GB is pulled in. The upstream
# package (2022 wheel) installs without its dependencies: its pins (flax 0.3.3, TensorFlow,
# ...) cannot install beside a modern JAX; parity/upstream.py shims what it needs. pip then
# lists the wheel's unmet pins as "dependency conflicts" and exits 0. timm (for its
# NativeScaler, tests/test_integrations.py) also installs without its dependencies: they are
# torchvision, whose wheel needs torch's CUDA libraries, and what transformers already brings.
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==$(TORCH_VERSION)
	$(PIP) -e '.[test]' torch==$(TORCH_VERSION)
	$(PIP) --no-deps learned-optimization==0.0.1
	$(PIP) --no-deps 'timm>=1.0'
	touch $(STAMP)

# A second venv with torch's CUDA build of the same version (what a GPU user installs; about
# 5.5 GB, installed once: the stamp), where scripts/check_cuda_torch_build.py builds the fused
# kernels and checks their ops and CUDA launchers (no GPU needed). `===` matches the version
# string exactly, so that a local `+cpu` wheel of that version is never taken for it.
CUDA_VENV := .venv-cuda
CUDA_STAMP := $(CUDA_VENV)/.installed
CUDA_PIP := $(CUDA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check
$(CUDA_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PIP) 'torch===$(TORCH_VERSION)' numpy ninja
	$(CUDA_PIP) -e .
	touch $(CUDA_STAMP)

check-cuda-torch: $(CUDA_STAMP)
	$(CUDA_VENV)/bin/python scripts/check_cuda_torch_build.py

# The fused kernels (lopt-port build: what was built, the time; a cached build is checked by
# ninja in about a second). `build-test` adds what `make test` runs: the emulated CUDA backend
# (the tests and the gate's cuda-emulated lines) and, on an AVX-512 CPU, the CPU backend
# without AVX-512 (tests/test_build.py's slow test), built in a second process on the core
# that ninja leaves idle during most of the first build.
build: $(STAMP)
	$(BIN)/lopt-port build

build-test: $(STAMP)
	$(BIN)/lopt-port build --emulated --lower-level

GATE_SRC := checkpoints/small_fc_h32_sm0p01
VELO_SRC := checkpoints/velo_small
MULO_SRC := checkpoints/mulo_h32_sm0p01
CELO_SRC := checkpoints/celo
CELO_ADAM_SRC := checkpoints/celo_adam

demo: build
	$(BIN)/python scripts/main_job.py

test: build-test check-cuda-torch
	$(BIN)/ruff check .
	$(BIN)/lopt-parity $(GATE_SRC) --gate --reference builtin --tasks 16 --steps 20 \
		--free-task mlp --free-steps 200
	$(BIN)/lopt-parity $(GATE_SRC) --gate --reference upstream --tasks 4 --steps 20 \
		--free-steps 0
	$(BIN)/lopt-parity $(GATE_SRC) --gate --impl fused --reference builtin --tasks 16 \
		--steps 20 --free-task conv --free-steps 100
	$(BIN)/lopt-parity $(GATE_SRC) --gate --impl fused --reference upstream --tasks 4 \
		--steps 20 --free-steps 0
	$(BIN)/lopt-parity $(GATE_SRC) --gate --impl cuda-emulated --reference builtin --tasks 2 \
		--steps 20 --free-task conv --free-steps 20
	$(BIN)/lopt-parity $(VELO_SRC) --gate --reference builtin --tasks 8 --steps 30 \
		--num-steps 50 --free-task mlp --free-steps 100
	$(BIN)/lopt-parity $(VELO_SRC) --gate --impl fused --reference builtin --tasks 8 \
		--steps 30 --num-steps 50 --free-task conv --free-steps 100
	$(BIN)/lopt-parity $(VELO_SRC) --gate --impl cuda-emulated --reference builtin --tasks 1 \
		--steps 20 --num-steps 50 --free-task conv --free-steps 20
	$(BIN)/lopt-parity $(MULO_SRC) --gate --reference builtin --tasks 4 --steps 10 \
		--free-task mlp --free-steps 50
	$(BIN)/lopt-parity $(MULO_SRC) --gate --impl fused --reference builtin --tasks 4 \
		--steps 10 --free-task conv --free-steps 50
	$(BIN)/lopt-parity $(MULO_SRC) --gate --impl cuda-emulated --reference builtin --tasks 1 \
		--steps 20 --free-steps 0
	$(BIN)/lopt-parity $(CELO_SRC) --gate --reference builtin --tasks 6 --steps 20 \
		--num-steps 50 --free-task mlp --free-steps 100
	$(BIN)/lopt-parity $(CELO_SRC) --gate --impl fused --reference builtin --tasks 6 \
		--steps 20 --num-steps 50 --free-task conv --free-steps 100
	$(BIN)/lopt-parity $(CELO_SRC) --gate --impl cuda-emulated --reference builtin --tasks 1 \
		--steps 20 --num-steps 50 --free-steps 0
	$(BIN)/lopt-parity $(CELO_ADAM_SRC) --gate --reference builtin --tasks 6 --steps 20 \
		--num-steps 50 --free-task mlp --free-steps 100
	$(BIN)/lopt-parity $(CELO_ADAM_SRC) --gate --impl fused --reference builtin --tasks 6 \
		--steps 20 --num-steps 50 --free-task conv --free-steps 100
	$(BIN)/python -m pytest

quick: build
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) $(CUDA_VENV) out build *.egg-info
