"""Seeded tiny checkpoints built in code: the INF-34B layout (LayerNorm + bias) or Llama's (RMSNorm)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from inf_quant.core.paths import DEFAULT_MODEL
from inf_quant.save.write import INFLM_AUTO_MAP, copy_modeling_files, save_sharded, write_json

TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0)


def tiny_config(model_type: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig

    from inf_quant.models.configuration_inflm import INFLMConfig

    kw = dict(TINY, vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=3, **overrides)
    return INFLMConfig(layer_norm_eps=1e-5, **kw) if model_type == "inflm" else LlamaConfig(rms_norm_eps=1e-6, **kw)


def tiny_model(model_type: str, vocab_size: int = 8192, seed: int = 0, **overrides):
    """A random model with non-trivial norm weights/biases (so folding and LayerNorm bias paths matter)."""
    from transformers import LlamaForCausalLM

    from inf_quant.models.modeling_inflm import INFLMForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size, **overrides)
    model = (INFLMForCausalLM if model_type == "inflm" else LlamaForCausalLM)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


def build_tiny_checkpoint(out: Path, model_type: str, vocab_size: int = 8192, seed: int = 0,
                          max_shard_bytes: int = 600_000, dtype=torch.bfloat16, **overrides) -> Path:
    """Write a tiny model like INF-34B's release: bf16 shards + index, config with auto_map, tokenizer files."""
    model = tiny_model(model_type, vocab_size, seed, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_sharded(tensors, out, max_shard_bytes)
    cfg = model.config.to_dict()
    cfg.pop("transformers_version", None)
    cfg["architectures"] = ["INFLMForCausalLM" if model_type == "inflm" else "LlamaForCausalLM"]
    cfg["dtype"] = "bfloat16"
    if model_type == "inflm":
        copy_modeling_files(out)
        cfg["auto_map"] = dict(INFLM_AUTO_MAP)
    write_json(out / "config.json", cfg)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(DEFAULT_MODEL / name, out / name)
    if model_type == "llama":  # a Llama checkpoint has no inflm remote code: drop the auto_map
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc.pop("auto_map", None)
        write_json(out / "tokenizer_config.json", tc)
    return out
