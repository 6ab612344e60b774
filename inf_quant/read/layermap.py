"""Architecture knowledge as one declarative table keyed by config.json's `model_type`.

Adding a Llama-shaped family means adding an entry to LAYER_MAPS, never a class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..core.errors import CheckpointError



class Norm(Enum):
    RMS = "rms"      # weight only (Llama)
    LAYER = "layer"  # weight and bias (INF-34B's nn.LayerNorm)


@dataclass(frozen=True)
class LinearGroup:
    names: tuple[str, ...]  # relative to a decoder layer; they share one input (one H, one AWQ scale)
    input_from: str         # module whose output feeds them; AWQ folds its scale there
    inspect: str = ""       # AWQ scores a scale on this module's output (AutoAWQ's module2inspect); "" = the linears'
    no_clip: tuple[str, ...] = ()  # AWQ skips their clip search (q/k: the q.k product hides clip error; AutoAWQ)


@dataclass(frozen=True)
class LayerMap:
    embed: str                       # "model.embed_tokens"
    blocks: str                      # "model.layers"
    final_norm: str                  # "model.norm"
    lm_head: str                     # "lm_head"
    norm: Norm
    groups: tuple[LinearGroup, ...]  # quantized in this order; each sees earlier groups quantized
    shapes: dict = field(default_factory=dict, hash=False)  # linear -> (out dim, in dim), names of DIMS
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # the decoder layer as residual halves, h = x + module(norm(x)), in order (forward.run_half)
    halves: tuple[tuple[str, str], ...] = (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))
    # per half, the linear whose output IS the module's output: the half is x + out_linear(its input)
    half_outputs: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.names)

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks}.{i}."


LLAMA_GROUPS = (
    LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
                inspect="self_attn", no_clip=("self_attn.q_proj", "self_attn.k_proj")),
    LinearGroup(("self_attn.o_proj",), "self_attn.v_proj"),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", inspect="mlp"),
    LinearGroup(("mlp.down_proj",), "mlp.up_proj"),
)

LLAMA_SHAPES = {
    "self_attn.q_proj": ("q", "hidden"), "self_attn.k_proj": ("kv", "hidden"), "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "q"), "mlp.gate_proj": ("ffn", "hidden"), "mlp.up_proj": ("ffn", "hidden"),
    "mlp.down_proj": ("hidden", "ffn"),
}

LAYER_MAPS = {
    "llama": LayerMap("model.embed_tokens", "model.layers", "model.norm", "lm_head", Norm.RMS, LLAMA_GROUPS,
                      LLAMA_SHAPES),
    "inflm": LayerMap("model.embed_tokens", "model.layers", "model.norm", "lm_head", Norm.LAYER, LLAMA_GROUPS,
                      LLAMA_SHAPES),
    # INF-34B in transformers' StableLM layout (layout.py): the same modules, names and LayerNorm (weight + bias)
    "stablelm": LayerMap("model.embed_tokens", "model.layers", "model.norm", "lm_head", Norm.LAYER, LLAMA_GROUPS,
                         LLAMA_SHAPES),
}


# config.json fields the code reads (config_dims below, memory.py, the transformers config built from it)
NEEDED_INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # null / absent: derived or default
OPTIONAL_FLOATS = ("rope_theta", "layer_norm_eps", "rms_norm_eps")
OPTIONAL_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")  # they decide which tensors exist


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(config: dict, path: Path) -> None:
    """Every config.json value the code reads has its type and range: one line naming the file, key and value.
    (Checked once, in pre-flight, so config_dims and the transformers config can take them as they are.)"""
    where = path / "config.json"

    def bad(key: str, rule: str):
        return CheckpointError(f"{where}: {key}={config_value(config, key)!r} must be {rule}; correct it in "
                               "config.json (it must describe the checkpoint's tensors)")

    for key in NEEDED_INTS:
        if key not in config:
            raise CheckpointError(f"{path}: config.json lacks or mangles {key!r}: it is missing ("
                                  f"{', '.join(NEEDED_INTS)} are needed); restore the model's config.json")
    for key in NEEDED_INTS + OPTIONAL_INTS:
        v = config.get(key)
        if (key in NEEDED_INTS or v is not None) and not (_is_int(v) and v > 0):
            raise bad(key, "a positive integer (a JSON number without quotes or decimals)")
    rope = config.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise bad("rope_parameters", "an object ({\"rope_theta\": ..., \"rope_type\": ...}) or absent")
    for key in OPTIONAL_FLOATS + ("rope_parameters.rope_theta",):
        v = config_value(config, key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v > 0):
            raise bad(key, "a finite number > 0")
    for key in OPTIONAL_BOOLS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    for key in ("model_type", "hidden_act"):
        if not isinstance(config.get(key, ""), str):
            raise bad(key, "a string (e.g. " + ("'inflm')" if key == "model_type" else "'silu')"))
    heads, kv, given_head_dim = (config.get(k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    if kv is not None and heads % kv:
        raise bad("num_key_value_heads", f"a divisor of num_attention_heads={heads}")
    if given_head_dim is None and config["hidden_size"] % heads:
        raise bad("hidden_size", f"divisible by num_attention_heads={heads} (or give head_dim)")


def config_value(config: dict, key: str):
    """config[key], or a nested value for 'section.key' (None where absent)."""
    v = config
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def head_dim(config: dict) -> int:
    """The width of one attention head, from config.json: its head_dim, else hidden_size / num_attention_heads
    (what transformers derives when head_dim is absent or null). The one place it is derived."""
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def config_dims(config: dict) -> dict[str, int]:
    """The named dimensions of LayerMap.shapes, from config.json."""
    try:
        heads, hd = int(config["num_attention_heads"]), head_dim(config)
        return {"hidden": int(config["hidden_size"]), "ffn": int(config["intermediate_size"]), "q": heads * hd,
                "kv": int(config.get("num_key_value_heads") or heads) * hd, "vocab": int(config["vocab_size"]),
                "layers": int(config["num_hidden_layers"])}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json lacks or mangles {e} (hidden_size, intermediate_size, "
                              "num_attention_heads, num_hidden_layers and vocab_size are needed)") from None


def expected_tensors(lmap: LayerMap, config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name the config implies, with its shape (lm_head only when the embeddings are not tied)."""
    d = config_dims(config)
    out = {f"{lmap.embed}.weight": (d["vocab"], d["hidden"])}
    norm = ("weight", "bias") if lmap.norm is Norm.LAYER else ("weight",)
    for i in range(d["layers"]):
        p = lmap.block_prefix(i)
        out.update({f"{p}{n}.weight": (d[o], d[k]) for n, (o, k) in lmap.shapes.items()})
        out.update({f"{p}{n}.{w}": (d["hidden"],) for n in lmap.norms for w in norm})
    out.update({f"{lmap.final_norm}.{w}": (d["hidden"],) for w in norm})
    if not config.get("tie_word_embeddings", False):
        out[f"{lmap.lm_head}.weight"] = (d["vocab"], d["hidden"])
    return out


def layer_map_for(model_type: str) -> LayerMap:
    try:
        return LAYER_MAPS[model_type]
    except KeyError:
        raise CheckpointError(
            f"config.json model_type={model_type!r} is not supported; supported: {', '.join(sorted(LAYER_MAPS))}"
        ) from None
