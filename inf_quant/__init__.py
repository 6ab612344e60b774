"""inf-quant: GPTQ/AWQ quantization, verification and release tooling for INF-34B (model_type `inflm`) and Llama.

Importing the package registers the `inflm` architecture and INFLMTokenizer with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works for INF checkpoints without remote code.
"""

__version__ = "0.1.0"


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models.configuration_inflm import INFLMConfig
    from .models.modeling_inflm import INFLMForCausalLM
    from .models.tokenization_inflm import INFLMTokenizer

    AutoConfig.register("inflm", INFLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(INFLMConfig, INFLMForCausalLM, exist_ok=True)
    AutoTokenizer.register(INFLMConfig, slow_tokenizer_class=INFLMTokenizer, exist_ok=True)


_register()
