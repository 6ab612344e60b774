# Two commands do all the set-up on a fresh machine (see README):
#   make demo   - the main job on the bundled default model (quantize, load back in plain transformers, report)
#   make test   - the test suite (offline, CPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# gptqmodel (transformers' GPTQ/AWQ loading backend) on a small CPU machine: no 15-minute C++ pack-extension
# build, and worker threads that fit 2 cores.
export GPTQMODEL_DISABLE_PACK_EXT ?= 1
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: setup demo test clean

setup: $(BIN)/.installed

# torch first, pinned to the CPU wheel: an unpinned torch (or one pulled in by a dependency) is a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/inf-quant gptq --bits 4 --force
	$(BIN)/python scripts/demo_check.py out/inf-tiny-gptq-w4g128

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
