"""Loader-facing layouts of an INF-architecture checkpoint, `inflm` (as INF ships it) and `stablelm` (no remote
code): the rules, over config.json dicts. Pure and torch-free: the loader, the pipeline, verify and the writers share it.

INF-34B's block is transformers' `StableLmForCausalLM` in one particular configuration: a Llama body whose input,
post-attention and final norms are `nn.LayerNorm` (weight + bias), GQA, a gated SiLU MLP, an untied head and the
same tensor names (q/k/v/o_proj, gate/up/down_proj, input/post_attention_layernorm, model.norm, lm_head). StableLM's
own defaults differ (partial rotary 0.25), so the four settings in STABLELM_SETTINGS are written explicitly. The
tensors are unchanged; only config.json and the tokenizer files differ between the layouts:

    inflm     model_type inflm, auto_map -> the copied modeling files, slow INFLMTokenizer (+ tokenizer.json)
    stablelm  model_type stablelm, no auto_map, no Python files, PreTrainedTokenizerFast over tokenizer.json

`output.apply_layout` writes a layout's files; `export.export_layout` rewrites a finished directory.
"""

from __future__ import annotations

from ..core.config import Layout
from ..core.errors import CheckpointError, ConfigError
from .layermap import head_dim

# StableLM settings under which it computes INF-34B's function (transformers' defaults: 0.25, False, False, False)
STABLELM_SETTINGS = {"partial_rotary_factor": 1.0, "use_qkv_bias": False, "qk_layernorm": False,
                     "use_parallel_residual": False}
# config.json keys whose meaning is the same in both layouts
CARRIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "layer_norm_eps",
           "use_cache", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
           "torch_dtype", "attention_dropout", "quantization_config")
INF_FAMILY = "inflm"


def rope_theta(cfg: dict, where: str) -> float:
    """INF's rope base from a transformers 5 (`rope_parameters`) or 4.x (`rope_theta`) config; plain rope only."""
    rope = cfg.get("rope_parameters") or {}
    if (cfg.get("rope_scaling") or {}).get("rope_type", "default") != "default" or \
            rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{where}: rope scaling {cfg.get('rope_scaling') or rope} is not exported to stablelm "
                          "(vLLM's and SGLang's StableLM pass only the rope base); serve the inflm layout")
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if not isinstance(theta, (int, float)):
        raise ConfigError(f"{where}: config.json has no rope_theta")
    return float(theta)


def stablelm_config(cfg: dict, where: str) -> dict:
    """config.json of the stablelm layout from an inflm one; refuses settings StableLM cannot express."""
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    problems = []
    if head_dim(cfg) != hidden // heads or hidden % heads:
        problems.append(f"head_dim={cfg.get('head_dim')} != hidden_size/num_attention_heads (StableLM derives it)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            problems.append(f"{key}=true")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.get('hidden_act')!r}")
    if problems:
        raise ConfigError(f"{where}: cannot be expressed as StableLM: {'; '.join(problems)}")
    theta = rope_theta(cfg, where)
    out = {k: cfg[k] for k in CARRIED if k in cfg}
    out.update(model_type="stablelm", architectures=["StableLmForCausalLM"], hidden_dropout=0.0, rope_theta=theta,
               rope_parameters={"rope_theta": theta, "rope_type": "default", "partial_rotary_factor": 1.0},
               **STABLELM_SETTINGS)
    return out


def is_inf_stablelm(cfg: dict) -> bool:
    """A stablelm config in INF's settings (so it computes the inflm function); StableLM's own defaults are not."""
    if cfg.get("model_type") != "stablelm":
        return False
    factor = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor"))
    return factor == 1.0 and not any(cfg.get(k) for k in ("use_qkv_bias", "qk_layernorm", "use_parallel_residual"))


def architecture(cfg: dict) -> str:
    """The function a config describes: 'inflm' for both INF layouts, else config.json's model_type."""
    return INF_FAMILY if cfg.get("model_type") == "inflm" or is_inf_stablelm(cfg) else cfg.get("model_type", "")


def check_layout(cfg: dict, layout: Layout, where: str) -> None:
    """Before any work: can an output of checkpoint config `cfg` be written in `layout`?"""
    mt = cfg.get("model_type")
    if mt == "stablelm" and not is_inf_stablelm(cfg):
        raise CheckpointError(f"{where}: a stablelm checkpoint is supported only in INF's settings "
                              f"({', '.join(f'{k}={v}' for k, v in STABLELM_SETTINGS.items())})")
    if layout is Layout.STABLELM and architecture(cfg) != INF_FAMILY:
        raise ConfigError(f"{where}: serve_as=stablelm applies to INF-architecture checkpoints; this one is "
                          f"model_type {mt!r}: drop --serve-as stablelm")
    if layout is Layout.INFLM and mt == "stablelm":
        raise ConfigError(f"{where}: the input is already in the stablelm layout and converting back to inflm is not "
                          "implemented; pass --serve-as stablelm (or quantize the inflm original)")
    if layout is Layout.STABLELM and mt == "inflm":
        stablelm_config(cfg, where)  # raises for settings StableLM cannot express
