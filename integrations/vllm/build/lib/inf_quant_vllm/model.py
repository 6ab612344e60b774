"""INF-34B for vLLM: vLLM's StableLM model with the packed-module mapping its GPTQ path needs."""

from vllm.model_executor.models.stablelm import StablelmForCausalLM


class INFLMForCausalLM(StablelmForCausalLM):
    """vLLM's `StablelmForCausalLM` (LayerNorm with bias, fused qkv_proj and gate_up_proj) that names its fused
    layers' checkpoint parts, as vLLM's `LlamaForCausalLM` does. vLLM's GPTQ config matches a fused layer to the
    checkpoint's quantized layers through this mapping (`is_layer_gptq_quantized` in
    vllm/model_executor/layers/quantization/utils/gptq_utils.py); without it the fused layers are built
    unquantized."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
