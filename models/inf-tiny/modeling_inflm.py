"""INF-34B (`model_type: inflm`) causal LM for transformers 5.x.

Standalone like `configuration_inflm.py` (copied into every checkpoint inf-quant writes). Attention, rope, MLP,
caching and generation are transformers' Llama code; only the three norms differ: `nn.LayerNorm(hidden,
eps=layer_norm_eps)` with weight and bias, as in INF's published 4.42-era remote code.
"""

from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

try:  # the checkpoint copy sits beside configuration_inflm.py; inside inf_quant it is a package sibling
    from .configuration_inflm import INFLMConfig
except ImportError:  # pragma: no cover - only when the file is imported as a top-level module
    from configuration_inflm import INFLMConfig


def _layer_norm(config: INFLMConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class INFLMPreTrainedModel(LlamaPreTrainedModel):
    config_class = INFLMConfig
    config: INFLMConfig

    def _init_weights(self, module):
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class INFLMModel(INFLMPreTrainedModel, LlamaModel):
    """The Llama body with LayerNorm (weight + bias) for input, post-attention and final norms."""

    def __init__(self, config: INFLMConfig):
        LlamaModel.__init__(self, config)
        for layer in self.layers:
            layer.input_layernorm = _layer_norm(config)
            layer.post_attention_layernorm = _layer_norm(config)
        self.norm = _layer_norm(config)
        self.post_init()


class INFLMForCausalLM(INFLMPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: INFLMConfig):
        INFLMPreTrainedModel.__init__(self, config)
        self.model = INFLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["INFLMForCausalLM", "INFLMModel", "INFLMPreTrainedModel"]
