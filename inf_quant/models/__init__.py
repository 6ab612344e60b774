"""INF-34B's config, model and tokenizer for transformers (copied into every checkpoint written, see write.py).

transformers is imported here, before any of these modules: inf_quant registers them with the Auto classes the
moment transformers finishes importing (inf_quant/__init__.py), which must not happen while one of them is
half-imported.
"""

import transformers  # noqa: F401
