"""inf-quant: GPTQ/AWQ quantization, verification and release tooling for INF-34B (model_type `inflm`) and Llama.

Importing the package registers the `inflm` architecture and INFLMTokenizer with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works for INF checkpoints without remote code. The registration runs
as soon as transformers is imported (at once if it already is), so `import inf_quant` itself stays light: the CLI
answers `--help` and argument or pre-flight errors without importing torch or transformers.

The folders are the pipeline's stages, in order: models/ (INF's modeling files), core/ (recipe, errors, paths,
hashes), read/ (the input checkpoint), data/ (calibration tokens), quant/ (the math), engine/ (the math over one
layer), save/ (the output directory), evaluate/ (what verify measures); each imports only the ones before it. At
the top are the commands that run them: preflight.py, pipeline.py (quantize), verify.py, export.py, release.py, and
the CLI (cli.py, cli_args.py, console.py).
"""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models.configuration_inflm import INFLMConfig
    from .models.modeling_inflm import INFLMForCausalLM
    from .models.tokenization_inflm import INFLMTokenizer

    AutoConfig.register("inflm", INFLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(INFLMConfig, INFLMForCausalLM, exist_ok=True)
    AutoTokenizer.register(INFLMConfig, slow_tokenizer_class=INFLMTokenizer, exist_ok=True)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds `transformers` like the normal path finder, and runs _register() once its __init__ has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())
