"""Shared fixtures: offline mode, and seeded tiny checkpoints written like INF-34B's (sharded safetensors)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(params=["inflm", "llama"])
def tiny_ckpt(request, tmp_path_factory):
    """A 2-block, D=64, 8 query / 2 KV heads, FFN 192 checkpoint in 3+ shards, LayerNorm+bias or RMSNorm."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def inflm_ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("inflm"), "inflm")

# gptqmodel (the loading stack transformers uses for GPTQ/AWQ) on 2 CPU cores: no C++ pack extension build,
# and a worker count that fits the machine. Subprocesses inherit these.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
