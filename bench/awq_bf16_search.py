"""Is AWQ's scale search exact enough with bf16 GEMMs? Measured on SmolLM2-135M's real layers.

    python bench/awq_bf16_search.py [--samples 16] [--seqlen 512] [--layers 30]

A bf16 run (--dtype bfloat16, the CUDA default) captures each group's input in bf16, and the groups scored on
their own linears' outputs (v -> o_proj, up -> down_proj) run linear_output_loss's GEMM in bf16 with fp32
accumulation (quant/awq.py). This script runs, layer by layer on the model's own (unquantized) activations,
search_scale for those groups twice on the same bf16 captures: with the bf16 GEMM, and with the captures upcast to
fp32 (the fp32 GEMM). It prints, over all layers and groups: how often the chosen (form, alpha) agree, the largest
relative difference of any candidate's loss, and how much worse (under the fp32 loss) the bf16 choice is where
they disagree. Not a test: a measurement for bench/RESULTS.md. CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, default=30, help="how many layers from the first")
    a = ap.parse_args()
    from smollm2 import ensure_smollm2

    from inf_quant.core.config import (AWQConfig, CalibConfig, DType, Method, ModelConfig, OutputConfig, Recipe,
                                       RunConfig)
    from inf_quant.engine.awq_block import capture_group_inputs
    from inf_quant.engine.forward import forward_all
    from inf_quant.pipeline import prepare
    from inf_quant.quant.awq import _fake_quant, linear_output_loss, search_scale
    from inf_quant.read.load import embed_ids, load_block, rotary, skeleton

    model = ensure_smollm2()
    recipe = Recipe(method=Method.AWQ, model=ModelConfig(path=str(model)),
                    calibration=CalibConfig(samples=a.samples, seqlen=a.seqlen), awq=AWQConfig(group_size=64),
                    run=RunConfig(dtype=DType.BF16), output=OutputConfig(dir="/tmp/awq-bf16-unused", force=True))
    ctx = prepare(recipe)
    cfg = recipe.awq
    groups = [g for g in ctx.lmap.groups if not g.inspect]
    skel = skeleton(ctx.config)
    t0 = time.monotonic()
    rows, worse, max_rel = [], [], 0.0
    with torch.no_grad():
        hidden = embed_ids(ctx.ckpt, ctx.ids, ctx.device, ctx.dtype)
        rope = rotary(ctx.config, ctx.device)(hidden[:1], torch.arange(hidden.shape[1])[None])
        for i in range(min(a.layers, ctx.ckpt.num_layers)):
            block = load_block(ctx.ckpt, skel, i, ctx.device, ctx.dtype)
            xs, _ = capture_group_inputs(block, groups, hidden, rope, recipe.run.forward_batch)
            for g, x in zip(groups, xs):
                assert x.dtype == torch.bfloat16
                ws = [block.get_submodule(n).weight.float() for n in g.names]
                x2 = x.reshape(-1, x.shape[-1])
                r16 = search_scale(x2, ws, cfg, linear_output_loss(x2, ws))
                x32 = x2.float()
                r32 = search_scale(x32, ws, cfg, linear_output_loss(x32, ws))
                l32 = {(f, al): v for f, al, v in r32.tried}
                for f, al, v in r16.tried:
                    if (f, al) in l32:
                        max_rel = max(max_rel, abs(v - l32[(f, al)]) / l32[(f, al)])
                same = (r16.form, r16.alpha) == (r32.form, r32.alpha)
                if not same:
                    chosen = l32.get((r16.form, r16.alpha))
                    if chosen is None:  # the bf16 search's neighbourhood was not scored by the fp32 one
                        s = r16.scales
                        chosen = linear_output_loss(x32, ws)(
                            [_fake_quant(w * s, cfg.bits, cfg.group_size, cfg.zero_point) / s for w in ws])
                    worse.append(chosen / r32.loss - 1)
                rows.append(same)
            hidden = forward_all(block, hidden, rope, recipe.run.forward_batch, in_place=True)
            print(f"layer {i}: {sum(rows)}/{len(rows)} choices agree so far", file=sys.stderr)
    print(f"SmolLM2-135M, {a.samples} x {a.seqlen} bf16 captures, groups {', '.join('+'.join(g.names) for g in groups)}"
          f", {min(a.layers, ctx.ckpt.num_layers)} layers, {time.monotonic() - t0:.0f} s")
    print(f"same (form, alpha) as the fp32 GEMM: {sum(rows)}/{len(rows)}")
    print(f"largest relative difference of a candidate's loss, bf16 vs fp32 GEMM: {max_rel:.2e}")
    if worse:
        print(f"where they differ: the bf16 choice's fp32 loss is {100 * max(worse):.3f} % above the fp32 choice "
              f"at most, {100 * sum(worse) / len(worse):.3f} % on average")


if __name__ == "__main__":
    main()
