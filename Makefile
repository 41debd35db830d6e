# Two commands: `make repro` (set up + run the default pipeline) and `make test` (set up + run the tests).
# Everything lives in .venv; nothing is installed outside it except by `make system-deps` (apt, needs root).

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

.PHONY: setup repro test test-slow test-all lint bench clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

repro: setup
	$(BIN)/dvc repro

# Tests use tiny models: one OpenMP thread each is as fast, and does not stall when the machine is busy.
test test-slow test-all: export OMP_NUM_THREADS ?= 1

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check gpt stages tests bench

bench: setup
	$(BIN)/python -m bench.run_all

# Debian/Ubuntu packages the full pipeline and the tests use (apertium MT, dictionaries, a browser).
system-deps:
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		apertium apertium-eng-spa dict-freedict-eng-ind chromium chromium-driver

clean:
	rm -rf $(VENV) .pytest_cache
