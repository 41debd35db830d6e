# Two commands: `make repro` (set up + run the default pipeline) and `make test` (set up + run the tests).
# Python packages live in .venv. The Debian packages the default pipeline / the tests need are installed by
# tools/system-deps.sh when missing (as root or with passwordless sudo; otherwise it stops naming the command).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU torch by default; on a CUDA machine run `make setup TORCH_SPEC="torch"` (or install your CUDA build first).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
EXTRAS ?= pipeline,serve,dev
export DVC_NO_ANALYTICS := 1
# dvc.yaml runs `python -m stages.<name>`: the venv's python must be the one on PATH
export PATH := $(abspath $(BIN)):$(PATH)
# glibc otherwise returns large tensors to the OS and page-faults them back every step (see bench/README.md)
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: setup repro test test-slow test-all lint bench clean system-deps repro-deps test-deps slow-test-deps

# apertium: the default augment backend (offline MT); a C compiler for gpt/kernels (native bf16 kernels compiled on
# first use: the training step's softmax cross-entropy, the decode GEMV; without one ATen's slower ops are used).
# The tests also use the FreeDict dictionary and a browser.
REPRO_PACKAGES ?= apertium apertium-eng-spa gcc
TEST_PACKAGES  ?= $(REPRO_PACKAGES) dict-freedict-eng-ind chromium
# the slow tests compile llama.cpp (llama-cpp-python builds it from source at install time)
SLOW_TEST_PACKAGES ?= $(TEST_PACKAGES) cmake g++

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null

# --no-compile: pip would byte-compile every installed module (40 of setup's 83 s on 2 cores); Python compiles the
# ones a run imports on first use instead.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --no-compile "$(TORCH_SPEC)"
	$(BIN)/pip install --no-compile -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

# llama.cpp for the GGUF parity tests (tests/test_gguf.py) and bench/bench_llamacpp.py: a C++ build, 5.4 min on 2
# cores the first time (pip caches the wheel), so only the slow tests ask for it. LLAVA_BUILD=OFF skips the
# multimodal library (a quarter of the build; llama-cpp-python imports it only for image chat handlers).
$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(BIN)/pip install -c constraints.txt -e ".[llamacpp]"
	touch $@

repro-deps:
	@tools/system-deps.sh $(REPRO_PACKAGES)

test-deps:
	@tools/system-deps.sh $(TEST_PACKAGES)

slow-test-deps:
	@tools/system-deps.sh $(SLOW_TEST_PACKAGES)

repro: repro-deps setup
	$(BIN)/python -m gpt.data.check_raw
	$(BIN)/dvc repro

# Tests use tiny models: one OpenMP thread each is as fast, and does not stall when the machine is busy.
test test-slow test-all: export OMP_NUM_THREADS ?= 1

test: test-deps setup
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: slow-test-deps setup $(VENV)/.llamacpp
	$(BIN)/python -m pytest -m slow -q

test-all: slow-test-deps setup $(VENV)/.llamacpp
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check gpt stages tests bench

bench: setup
	$(BIN)/python -m bench.run_all

# Every Debian/Ubuntu package the pipeline and the tests use (make repro / make test install what they need).
system-deps:
	@tools/system-deps.sh $(TEST_PACKAGES)

clean:
	rm -rf $(VENV) .pytest_cache
