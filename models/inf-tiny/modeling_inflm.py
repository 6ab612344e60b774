"""INF-34B (`model_type: inflm`) causal LM for transformers 5.x.

Standalone like `configuration_inflm.py` (copied into every checkpoint inf-quant writes). Attention, rope, MLP,
caching and generation are transformers' Llama code; only the three norms differ: `nn.LayerNorm(hidden,
eps=layer_norm_eps)` with weight and bias, as in INF's published 4.42-era remote code.

A checkpoint written by `inf-quant gptq --lm-head` stores the head in GPTQ v1 (`quantization_config.lm_head: true`).
transformers' GPTQ loader converts only the decoder layers' linears, so this class builds that head itself
(`GPTQHead`): it holds the packed tensors and dequantizes them in each forward, computing with exactly the weight
inf-quant's unpacker (inf_quant/qformat.py `from_tensors`) gives — tested equal.
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

try:  # the checkpoint copy sits beside configuration_inflm.py; inside inf_quant it is a package sibling
    from .configuration_inflm import INFLMConfig
except ImportError:  # pragma: no cover - only when the file is imported as a top-level module
    from configuration_inflm import INFLMConfig


def _layer_norm(config: INFLMConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPTQHead(nn.Module):
    """The lm_head in GPTQ v1: qweight [K * bits / 32, N] int32 (K = hidden, N = vocab; field j of a word is input
    row 32 / bits * r + j), qzeros [n_groups, N * bits / 32] int32 (stored zero - 1, modulo 2**bits), scales
    [n_groups, N] fp16, g_idx [K] int32. forward: x @ W^T, W[n, k] = scales[g, n] * (code[k, n] - zero[g, n]),
    g = g_idx[k]; W is rebuilt per call, ROWS vocabulary rows at a time (memory: a [ROWS, K] slice, not [N, K])."""

    ROWS = 8192

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int):
        super().__init__()
        per, groups = 32 // bits, in_features // group_size if group_size > 0 else 1
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("qweight", torch.zeros(in_features // per, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))

    def _fields(self, words: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(0, 32, self.bits, dtype=torch.int32, device=words.device)
        return (words.unsqueeze(-1) >> shifts) & (2**self.bits - 1)                   # [..., 32 / bits]

    def dequantized(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """Rows n0:n1 of W (default all), [n1 - n0, K] fp32; n0 and n1 multiples of 32 / bits (or n1 = N)."""
        k, n1 = self.in_features, self.out_features if n1 is None else n1
        per = 32 // self.bits
        codes = self._fields(self.qweight[:, n0:n1]).transpose(1, 2).reshape(k, n1 - n0)   # [K, n1 - n0]
        stored = self._fields(self.qzeros[:, n0 // per: -(-n1 // per)]).reshape(self.qzeros.shape[0], -1)
        zero = ((stored + 1) & (2**self.bits - 1))[:, : n1 - n0]
        g = self.g_idx.long()
        return ((codes.float() - zero[g].float()) * self.scales[:, n0:n1].float()[g]).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.linear(x, self.dequantized(n0, min(n0 + self.ROWS, self.out_features))
                                               .to(x.dtype)) for n0 in range(0, self.out_features, self.ROWS)], -1)


def _quantized_head_spec(config) -> tuple | None:
    """(bits, group_size) of a GPTQ head (INFLMConfig.gptq_lm_head, from quantization_config.lm_head), else None."""
    spec = getattr(config, "gptq_lm_head", None)
    return (spec["bits"], spec["group_size"]) if spec else None


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
        spec = _quantized_head_spec(config)
        self.lm_head = (GPTQHead(config.hidden_size, config.vocab_size, *spec) if spec else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()


__all__ = ["INFLMForCausalLM", "INFLMModel", "INFLMPreTrainedModel", "GPTQHead"]
