"""Load a quantized release the way users do (plain transformers, in a fresh interpreter that never imports
inf_quant), generate from an English and a Chinese prompt, and compare eval perplexity with the bf16 baseline.

    python scripts/demo_check.py OUT_DIR [--baseline models/inf-tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, math, sys, torch, transformers
path, seqlen, windows = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, device_map="cpu",
                                                          dtype=torch.bfloat16)
assert "inf_quant" not in sys.modules
gens = {}
for prompt in ("The Python standard library", "对酒当歌，"):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    gens[prompt] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
nll, n = 0.0, 0
with torch.no_grad():
    for s in range(0, len(windows), 8):
        x = torch.tensor(windows[s:s + 8])
        logp = torch.log_softmax(model(x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])
        nll -= logp.sum().item(); n += logp.numel()
print(json.dumps({"kernel": type(model.model.layers[0].mlp.down_proj).__name__, "ppl": math.exp(nll / n),
                  "generations": gens}))
"""


def run(path: Path, seqlen: int, windows: list) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(seqlen)], input=json.dumps(windows),
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"loading {path} in plain transformers failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--baseline", type=Path, default=ROOT / "models" / "inf-tiny")
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from inf_quant.calibrate import read_records
    from inf_quant.evaluate import eval_windows
    from inf_quant.paths import EVAL
    from inf_quant.tokenizer import load_tokenizer

    windows = eval_windows(load_tokenizer(args.baseline), [r["text"] for r in read_records(EVAL)], args.seqlen)
    base, quant = run(args.baseline, args.seqlen, windows.tolist()), run(args.out, args.seqlen, windows.tolist())
    print(f"loaded {args.out} in plain transformers with kernel {quant['kernel']}")
    for prompt, text in quant["generations"].items():
        print(f"  {prompt!r} -> {text!r}")
    rise = 100 * (quant["ppl"] / base["ppl"] - 1)
    print(f"eval perplexity ({windows.numel()} tokens): bf16 {base['ppl']:.3f}, quantized {quant['ppl']:.3f} "
          f"({rise:+.2f} %)")


if __name__ == "__main__":
    main()
