"""Architecture knowledge as one declarative table keyed by config.json's `model_type`.

Adding a Llama-shaped family means adding an entry to LAYER_MAPS, never a class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

from .errors import CheckpointError

log = logging.getLogger(__name__)


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

LAYER_MAPS = {
    "llama": LayerMap("model.embed_tokens", "model.layers", "model.norm", "lm_head", Norm.RMS, LLAMA_GROUPS),
    "inflm": LayerMap("model.embed_tokens", "model.layers", "model.norm", "lm_head", Norm.LAYER, LLAMA_GROUPS),
    # INF-34B in transformers' StableLM layout (export.py): the same modules, names and LayerNorm (weight + bias)
    "stablelm": LayerMap("model.embed_tokens", "model.layers", "model.norm", "lm_head", Norm.LAYER, LLAMA_GROUPS),
}


def layer_map_for(model_type: str) -> LayerMap:
    try:
        return LAYER_MAPS[model_type]
    except KeyError:
        raise CheckpointError(
            f"config.json model_type={model_type!r} is not supported; supported: {', '.join(sorted(LAYER_MAPS))}"
        ) from None
