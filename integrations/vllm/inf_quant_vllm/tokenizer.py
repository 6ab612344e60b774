"""INF's tokenizer for vLLM: the checkpoint's `tokenizer.json`, never a conversion of `tokenizer.model`.

INF-34B ships a slow SentencePiece `INFLMTokenizer` (remote code) that pre-splits text with a GPT-4 regex. Without
that code, transformers converts `tokenizer.model` alone and gets other ids (seen on the bundled model: a 400-char
English text differs from the 8th token on), so a vLLM serving INF's original checkpoint would answer garbage
without an error. inf-quant writes the exact fast tokenizer (`tokenizer.json`) into every output; this class, which
`tokenizer_config.json`'s `"tokenizer_class": "INFLMTokenizer"` resolves to once the plugin is registered, loads it,
and refuses a directory that lacks it.
"""

import os

from transformers import PreTrainedTokenizerFast

FIX = "write it with `inf-quant export --as inflm SRC OUT` (or --as stablelm) and serve OUT"


class INFLMTokenizer(PreTrainedTokenizerFast):
    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        path = str(path)
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise ValueError(f"{path}: INF's tokenizer needs tokenizer.json beside tokenizer.model (a conversion of "
                             f"tokenizer.model alone gives other token ids); {FIX}")
        return PreTrainedTokenizerFast.from_pretrained(path, *args, **kwargs)
