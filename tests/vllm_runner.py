"""Runs in vLLM's own venv (not inf-quant's): serves each checkpoint of a spec through `vllm.LLM` and writes what it
computed as JSON. Imports only vLLM and the standard library; tests/test_vllm.py compares the figures with
transformers'.

    python tests/vllm_runner.py SPEC.json OUT.json

SPEC: {"models": [{"name": str, "path": str, "refused": bool (optional)}], "ids": [int], "text": str,
       "max_tokens": int, "max_model_len": int}
OUT:  {name: {"prompt_logprobs": [float] (len(ids) - 1: log p(ids[i] | ids[:i]) for i >= 1), "greedy": [int],
              "text_ids": [int] (the tokenizer's ids of `text`, no special tokens), "tokenizer": class name,
              "architecture": the model class vLLM built, "quantization": vLLM's quantization method}
      for a model marked "refused": {name: {"error": the last line of what vLLM raised, or null if it loaded}}
"""

import gc
import json
import os
import sys


def serve_one(path: str, spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, enforce_eager=True, dtype="bfloat16", max_model_len=spec["max_model_len"], seed=0)
    ids = spec["ids"]
    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, prompt_logprobs=0))[0]
    lps = [d[tok].logprob for tok, d in zip(ids[1:], out.prompt_logprobs[1:])]
    tok = llm.get_tokenizer()
    mc = llm.llm_engine.model_config
    res = {"prompt_logprobs": lps, "greedy": list(out.outputs[0].token_ids),
           "text_ids": tok.encode(spec["text"], add_special_tokens=False), "tokenizer": type(tok).__name__,
           "architecture": mc.architecture, "quantization": mc.quantization}
    del llm
    gc.collect()
    return res


def main() -> None:
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    results = {}
    for m in spec["models"]:
        if not m.get("refused"):
            results[m["name"]] = serve_one(m["path"], spec)
            continue
        try:
            serve_one(m["path"], spec)
            results[m["name"]] = {"error": None}
        except Exception as e:  # noqa: BLE001  the test asserts what was raised
            results[m["name"]] = {"error": str(e).strip().splitlines()[-1]}
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main()
