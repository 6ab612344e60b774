"""What a 4-bit lm_head costs in accuracy, on a real trained model (SmolLM2-135M-Instruct, bench/smollm2.py).

`gptq --lm-head` is written only for INF checkpoints (inflm layout: transformers' own Llama class would load the
head randomly initialised), and SmolLM2 is a Llama, so this runs the same steps as the pipeline's last one
(inf_quant/engine/head.py) by hand on SmolLM2's GPTQ-4 output:

1. `inf-quant gptq --bits 4 --group-size 64` on SmolLM2 (16 x 512 calibration windows, the defaults' sym grid);
2. the calibration windows through that quantized model: the final norm's outputs X, H = 2/n X^T X (head.py's
   head_hessian computes the same from the block loop's last hidden states);
3. head.solve_head: the tied head [49152, 576] solved by GPTQ with the same settings (an untied quantized head; the
   embedding stays bf16), and, for reference, the same grid rounded to nearest;
4. perplexity / KL / top-1 of the bf16 model and of the GPTQ-4 model with each head on the bundled eval set.

    python bench/lm_head_cost.py [--samples 16] [--seqlen 512] [--eval-windows 24] [--out /tmp/inf-quant-lmhead]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="/tmp/inf-quant-lmhead")
    a = ap.parse_args()

    import torch
    from peers import _scores
    from smollm2 import ensure_smollm2, eval_windows
    from transformers import AutoModelForCausalLM

    from inf_quant.core.config import CalibConfig, GPTQConfig, ModelConfig, OutputConfig, Recipe
    from inf_quant.engine.head import solve_head
    from inf_quant.pipeline import prepare
    from inf_quant.quant.gptq import hessian_add_, hessian_finish_
    from inf_quant.quant.grid import dequantize_weight, rtn_quantize

    model = str(ensure_smollm2())
    out = Path(a.out) / "smollm2-gptq-w4"
    cfg = GPTQConfig(group_size=a.group_size)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "inf_quant", "gptq", "--model", model, "--out", str(out), "--force", "-q",
                    "--bits", "4", "--group-size", str(a.group_size), "--samples", str(a.samples),
                    "--seqlen", str(a.seqlen), "--device", "cpu"], check=True)
    print(f"GPTQ-4 of the blocks: {time.monotonic() - t0:.0f} s", flush=True)
    ids = prepare(Recipe(model=ModelConfig(path=model), calibration=CalibConfig(samples=a.samples, seqlen=a.seqlen),
                         gptq=cfg, output=OutputConfig(dir=str(Path(a.out) / "never-written")))).ids
    q = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32)
    t0 = time.monotonic()
    with torch.no_grad():
        d = q.config.hidden_size
        acc, n = torch.zeros(d, d), 0
        for w in ids:
            n += hessian_add_(acc, q.model(w[None]).last_hidden_state[0])   # the final norm's output [T, D]
        h = hessian_finish_(acc, n)
        head = q.get_output_embeddings().weight.detach().float().clone()    # [V, D], tied to the embedding
        _, gptq_head, loss, damp = solve_head(head, h, cfg)
        rtn_head = dequantize_weight(rtn_quantize(head, cfg.bits, cfg.group_size, cfg.sym, "lm_head"))
    print(f"head solve ({head.shape[0]} x {head.shape[1]}): {time.monotonic() - t0:.1f} s, proxy loss {loss:.4g}, "
          f"damp {damp:g}", flush=True)

    windows = eval_windows(Path(model), a.seqlen, a.eval_windows)
    base, ref = _scores(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), windows)
    ref = torch.stack(ref)
    rows = [("bf16", base)]
    for name, w in (("GPTQ-4 blocks, bf16 head", None), ("GPTQ-4 blocks + GPTQ-4 head (--lm-head)", gptq_head),
                    ("GPTQ-4 blocks + round-to-nearest 4-bit head", rtn_head)):
        if w is not None:  # untie: a head of its own, the embedding unchanged
            q.lm_head = torch.nn.Linear(d, w.shape[0], bias=False)
            q.lm_head.weight.data = w.to(torch.float32)
        s, _ = _scores(q, windows, ref)
        rows.append((name, s))
    print(f"\nSmolLM2-135M, 4-bit g{a.group_size} sym, {a.samples} x {a.seqlen} calibration, "
          f"{len(windows)} x {a.seqlen} eval tokens (bundled eval set)")
    print("| model | PPL | rise vs bf16 | KL | top-1 |\n|---|---:|---:|---:|---:|")
    for name, s in rows:
        rise = 100 * (s["ppl"] / base["ppl"] - 1)
        print(f"| {name} | {s['ppl']:.3f} | {rise:+.1f} % | {s.get('kl', 0):.4f} | {100 * s.get('top1', 1):.1f} % |")


if __name__ == "__main__":
    main()
