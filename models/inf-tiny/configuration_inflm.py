"""INF-34B (`model_type: inflm`) configuration for transformers 5.x.

This file is standalone on purpose: inf-quant copies it next to every checkpoint it writes, with an `auto_map`,
so plain transformers loads the output with `trust_remote_code=True` in a process that never imports inf_quant.

INF-34B is a Llama body whose input, post-attention and final norms are `nn.LayerNorm` with weight *and* bias
(eps = `layer_norm_eps`). Everything else (GQA, rope, SwiGLU, untied head, no linear biases) is Llama's.
"""

from transformers.models.llama.configuration_llama import LlamaConfig


class INFLMConfig(LlamaConfig):
    model_type = "inflm"
    layer_norm_eps: float = 1e-5

    def __init__(self, **kwargs):
        # `inf-quant gptq --lm-head`: quantization_config.lm_head is true. transformers turns quantization_config
        # into its GPTQConfig, which drops that key, so the head's format is kept here for modeling_inflm.GPTQHead.
        q = kwargs.get("quantization_config")
        if isinstance(q, dict) and q.get("quant_method") == "gptq" and q.get("lm_head"):
            kwargs.setdefault("gptq_lm_head", {"bits": q["bits"], "group_size": q["group_size"]})
        super().__init__(**kwargs)


__all__ = ["INFLMConfig"]
