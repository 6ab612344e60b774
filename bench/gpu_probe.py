"""GPU probe: inf-quant's GPTQ and AWQ on real INF-34B layer shapes, extrapolated to the 48-layer model.

Builds a checkpoint with INF-34B's decoder layers (hidden 8192, FFN 22016, 64 query / 8 KV heads, LayerNorm
with bias; random bf16 weights) but only --layers of them and the bundled 8192-token vocabulary, then runs the
real pipeline (`inf_quant.pipeline.quantize`: streamed from shards, sequential, packed, written) on it and
prints per-layer seconds and peak VRAM, seconds per phase (bench/phases.py: read, forward, hessian, factor,
columns, setup, pack, write, awq; synchronized on CUDA), the expected peak and the 48-layer extrapolation. One short run fits a 15-minute GPU lease:

    python bench/gpu_probe.py --out /tmp/probe                     # GPTQ w4 128x2048 + AWQ w4 128x512, 3 layers
    python bench/gpu_probe.py --hidden 512 --ffn 1408 --heads 8 --kv-heads 2 --layers 2 --samples 4 --seqlen 128 \\
        --device cpu --out /tmp/probe-small                      # the same code path, small, on CPU

With --verify-seqlen N (e.g. 4096), `inf-quant verify` then runs on the GPTQ output at N-token windows (8 windows
of the bundled calibration text; the metrics mean nothing on random weights) and one more JSON line gives verify's
own peak per phase, measured (CUDA allocated) and expected (memory.expected_verify_peak), and the expectation for
the 48-layer model at the same shapes. --unproven-cuda graph-columns bf16-hessian switches on the opt-in CUDA paths
(run.unproven_cuda); each JSON line says which were on.

Prints one JSON line per method; record the numbers in bench/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inf_quant.core.config import (AWQConfig, CalibConfig, CudaPath, Device, DType, GPTQConfig, Method,  # noqa: E402
                                   ModelConfig, OutputConfig, Recipe, RunConfig)
from inf_quant.core.paths import DEFAULT_MODEL  # noqa: E402
from inf_quant.models.configuration_inflm import INFLMConfig  # noqa: E402
from inf_quant.pipeline import quantize  # noqa: E402
from inf_quant.save.write import copy_modeling_files, save_sharded_lazy, write_json  # noqa: E402
from phases import install  # noqa: E402


def build(out: Path, a) -> Path:
    """A random-weight INF-architecture checkpoint, written shard by shard (one layer in memory at a time)."""
    cfg = INFLMConfig(vocab_size=8192, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=4096,
                      rope_theta=500000.0, layer_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3)
    d, hd = a.hidden, a.hidden // a.heads
    shapes = {"model.embed_tokens.weight": (8192, d)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (a.kv_heads * hd, d),
                       p + "self_attn.v_proj.weight": (a.kv_heads * hd, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (a.ffn, d), p + "mlp.up_proj.weight": (a.ffn, d),
                       p + "mlp.down_proj.weight": (d, a.ffn)})
        for n in ("input_layernorm", "post_attention_layernorm"):
            shapes.update({p + n + ".weight": (d,), p + n + ".bias": (d,)})
    shapes.update({"model.norm.weight": (d,), "model.norm.bias": (d,), "lm_head.weight": (8192, d)})

    def make(keys):
        g = torch.Generator().manual_seed(len(keys[0]))
        out = {}
        for k in keys:
            if k.endswith("bias"):
                out[k] = torch.zeros(shapes[k], dtype=torch.bfloat16)
            elif len(shapes[k]) == 1:
                out[k] = torch.ones(shapes[k], dtype=torch.bfloat16)
            else:  # ~N(0, 1/fan_in): activations keep their scale through the layers
                out[k] = (torch.randn(shapes[k], generator=g) / shapes[k][1] ** 0.5).to(torch.bfloat16)
        return out

    out.mkdir(parents=True, exist_ok=True)
    sizes = {k: 2 * torch.Size(s).numel() for k, s in shapes.items()}
    save_sharded_lazy(sizes, make, out, 2_000_000_000)
    c = cfg.to_dict()
    c.update(architectures=["INFLMForCausalLM"], dtype="bfloat16")
    write_json(out / "config.json", c)
    copy_modeling_files(out)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (out / f).write_bytes((DEFAULT_MODEL / f).read_bytes())
    return out


def run(model: Path, out: Path, method: Method, a, spent: dict) -> dict:
    """One quantization of the probe checkpoint; spent: bench/phases.py's running seconds per phase."""
    seqlen = a.seqlen if method is Method.GPTQ else a.awq_seqlen
    recipe = Recipe(method=method, model=ModelConfig(path=str(model)),
                    calibration=CalibConfig(samples=a.samples, seqlen=seqlen),
                    gptq=GPTQConfig(bits=4, group_size=128), awq=AWQConfig(group_size=128),
                    run=RunConfig(device=Device(a.device), dtype=DType.AUTO, forward_batch=a.forward_batch,
                                  unproven_cuda=tuple(map(CudaPath, a.unproven_cuda))),
                    output=OutputConfig(dir=str(out / method.value), force=True))
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = dict(spent)
    t0 = time.monotonic()
    rep = quantize(recipe)
    phases = {k: round(spent[k] - before[k], 2) for k in spent if spent[k] - before[k] > 0.005}
    per_layer = [r.seconds for r in rep.results]
    steady = statistics.median(per_layer[1:] if len(per_layer) > 1 else per_layer)
    return {"method": method.value, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
            "shape": {"hidden": a.hidden, "ffn": a.ffn, "heads": a.heads, "kv_heads": a.kv_heads},
            "calibration": f"{a.samples}x{seqlen}", "layers": len(per_layer), "per_layer_s": per_layer,
            "total_s": round(time.monotonic() - t0, 2), "peak_vram_gib": round(rep.peak_vram / 2**30, 2),
            "peak_rss_gib": round(rep.peak_rss / 2**30, 2),
            "expected_peak_gib": round(rep.expected_peak / 2**30, 2),
            "per_layer_peak_vram_gib": [round(r.peak_vram / 2**30, 2) for r in rep.results],
            "phases_s": phases,
            "extrapolated_48_layers_min": round((48 * steady + (time.monotonic() - t0 - sum(per_layer))) / 60, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--ffn", type=int, default=22016)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--awq-seqlen", type=int, default=512)
    ap.add_argument("--forward-batch", type=int, default=8)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    ap.add_argument("--verify-seqlen", type=int, default=0, help="then verify the GPTQ output at this window length")
    ap.add_argument("--unproven-cuda", nargs="+", default=[], choices=[c.value for c in CudaPath],
                    help="opt-in CUDA paths (run.unproven_cuda)")
    a = ap.parse_args()
    model = build(a.out / "model", a)
    spent = install(sync=a.device == "cuda", sample_rss=False)[0]
    for m in a.methods:
        print(json.dumps({**run(model, a.out, Method(m), a, spent), "unproven_cuda": sorted(a.unproven_cuda)}),
              flush=True)
    if a.verify_seqlen and "gptq" in a.methods:
        print(json.dumps(verify_peak(model, a.out / "gptq", a)), flush=True)


def verify_peak(model: Path, quant: Path, a) -> dict:
    """verify on the probe's GPTQ output: its own peak per phase, measured and expected, + the 48-layer expectation."""
    from inf_quant.core.config import VerifyConfig
    from inf_quant.engine.memory import expected_verify_peak
    from inf_quant.evaluate.fit import checkpoint_bytes
    from inf_quant.read.layermap import layer_map_for
    from inf_quant.verify import verify

    t0 = time.monotonic()
    rep = verify(VerifyConfig(quantized=str(quant), baseline=str(model), eval="bundled", seqlen=a.verify_seqlen,
                              max_windows=8, device=Device(a.device), cache_dir=str(a.out / "cache"),
                              report_dir=str(a.out / "verify")))
    own = rep.vram.verify
    cfg = json.loads((model / "config.json").read_text())
    heads = 2 * 8192 * a.hidden * 2                          # the probe's fp16 embedding + lm_head (8192 vocab)
    weights_48 = (checkpoint_bytes(quant)[1] - heads) / a.layers * 48 + 2 * 96512 * a.hidden * 2
    exp48 = expected_verify_peak(layer_map_for("inflm"), {**cfg, "num_hidden_layers": 48, "vocab_size": 96512},
                                 int(weights_48), 8, a.verify_seqlen, 4, 2, True, on_host=a.device == "cpu")
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    return {"verify_seqlen": a.verify_seqlen, "windows": own["windows"], "seconds": round(time.monotonic() - t0, 1),
            "measured_gib": {k: gib(v["peak_bytes"]) for k, v in own["phases"].items()},
            "measured_added_gib": {k: gib(v["added_bytes"]) for k, v in own["phases"].items()},
            "expected_gib": {k: gib(v) for k, v in own["expected_terms"].items()},
            "expected_48_layers_vocab_96512_gib": {k: gib(v) for k, v in exp48.terms.items()}}


if __name__ == "__main__":
    main()
