"""INF-34B's config (`model_type: inflm`) as vLLM's StableLM model reads it.

INF-34B is a Llama body with `nn.LayerNorm` (weight and bias, eps `layer_norm_eps`) norms: exactly StableLM with
`partial_rotary_factor=1.0`, no qkv bias, no qk-norm, no parallel residual. The inflm config.json is Llama-shaped
(`rope_parameters`, `num_key_value_heads`, `layer_norm_eps`), so this class is Llama's config under INF's name with
StableLM's four settings fixed to INF's values; vLLM's StableLM reads nothing else.
"""

from transformers import LlamaConfig


class INFLMConfig(LlamaConfig):
    model_type = "inflm"

    def __init__(self, layer_norm_eps: float = 1e-5, **kwargs):
        self.layer_norm_eps = layer_norm_eps
        # StableLM's switches, at the values under which it computes INF-34B's function
        self.partial_rotary_factor = 1.0
        self.use_qkv_bias = False
        self.qk_layernorm = False
        self.use_parallel_residual = False
        super().__init__(**kwargs)
