"""vLLM plugin for INF-34B checkpoints and their inf-quant GPTQ / AWQ outputs, in both layouts.

Installed into vLLM's environment (`pip install integrations/vllm`), it is found through the `vllm.general_plugins`
entry point, which vLLM calls in every process it starts (API server, engine core, workers) before it reads a
config. `register()` then, through public APIs only:

- registers `INFLMConfig` for `model_type: inflm` with transformers' `AutoConfig`, so the inflm layout's config.json
  is read without running the checkpoint's remote code (vLLM passes trust_remote_code=False), and
  `INFLMTokenizer` (tokenizer.py), which loads the exact `tokenizer.json` inf-quant writes into every output and
  refuses a checkpoint without one instead of serving it with wrongly converted ids;
- registers `INFLMForCausalLM` with vLLM's `ModelRegistry` for both architecture names an INF checkpoint carries:
  `INFLMForCausalLM` (inflm layout) and `StableLmForCausalLM` (stablelm layout). The class is vLLM's own
  `StablelmForCausalLM` plus the `packed_modules_mapping` that vLLM's Llama has and its StableLM lacks: without it
  vLLM's GPTQ config cannot match the fused qkv_proj / gate_up_proj to the checkpoint's unfused quantized q/k/v and
  gate/up layers, builds them unquantized and crashes loading their `qweight`.

It imports neither inf_quant nor anything vLLM does not already bring. Safe to call more than once (vLLM may).
"""

from __future__ import annotations

__all__ = ["register", "ARCHITECTURES"]

# both layouts' architecture names -> our class; overriding StableLmForCausalLM only adds the packed-module mapping
ARCHITECTURES = ("INFLMForCausalLM", "StableLmForCausalLM")


def register() -> None:
    from transformers import AutoConfig, AutoTokenizer
    from vllm import ModelRegistry

    from .config import INFLMConfig
    from .tokenizer import INFLMTokenizer

    try:
        AutoConfig.register(INFLMConfig.model_type, INFLMConfig)
    except ValueError:  # already registered in this process (vLLM may call plugins more than once)
        pass
    try:
        AutoTokenizer.register(INFLMConfig, tokenizer_class=INFLMTokenizer)
    except ValueError:
        pass
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, "inf_quant_vllm.model:INFLMForCausalLM")
