"""inf-quant against GPTQModel 7.6 on the real model (SmolLM2-135M-Instruct), side by side in one invocation,
scored on text the defaults were not tuned on.

    python bench/peers.py [--configs gptq4-g64 gptq8-g64 awq4-g64] [--seeds 0 1] [--samples 16] [--seqlen 512]
                          [--heldout-windows 12] [--eval-windows 12] [--ours NAME="EXTRA CLI ARGS" ...]
                          [--tree NAME="CHECKOUT_DIR [ARGS]" ...] [--tools inf-quant gptqmodel]
                          [--tables RESULTS_JSON ...]

Both tools quantize the same bf16 checkpoint (bench/smollm2.py) from the same calibration token ids: inf-quant's
own windows of the bundled calibration set (`prepare(recipe).ids`) for each calibration seed, handed to GPTQModel
as `input_ids`. Every quantization runs in a fresh process, tools alternated within each seed, measured with
os.wait4: wall seconds, CPU seconds (user + system) and peak RSS (the child's own VmHWM).

Scoring, per source: the four held-out sources of eval/heldout.jsonl (none of them a calibration source; at most
--heldout-windows windows each), their token-weighted pool, and eval/ (documents of the calibration sources, the
set the defaults used to be tuned on) for continuity. Per output: perplexity rise over bf16, exact full-vocabulary
KL(bf16 || quantized) and top-1 agreement; tables give the median over the seeds and each seed's value. Each output
is loaded as the weights its packed tensors encode (inf_quant.evaluate.reference.load_dequantized; for GPTQModel's
outputs too) and every forward, bf16 model included, runs in bf16 (--score-dtype) with the log-softmax in fp32:
on this 2-core box the fp32 forwards through gptqmodel's CPU kernels (--loader transformers, as users load it)
were ~10 x slower, and those kernels also round the fp16 scales to bf16 (0.3 % relative error per linear,
the same for both tools' outputs). A round-to-nearest row (the same grid, no GPTQ/AWQ) is the floor every method
must beat. GPTQModel on CPU: GPTQMODEL_CPU_WORKERS=2, GPTQMODEL_DISABLE_PACK_EXT=1, offload_to_disk=False; AWQ with
backend=AWQ_TORCH and sym=False. Prints Markdown tables for bench/RESULTS.md and writes results.json; --tables
prints one table from several runs' results.json (e.g. GPTQModel's rows from one run, more variants from another).
Not a test: timings move with machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# SmolLM2's hidden size 576 = 9 x 64 is not divisible by 128, so group 128 cannot be written for it (by either
# tool without padding); g64 is the release grid's stand-in and g32 the finer one.
CONFIGS = {  # name: (method, bits, group size)
    "gptq4-g64": ("gptq", 4, 64), "gptq4-g32": ("gptq", 4, 32), "gptq8-g64": ("gptq", 8, 64),
    "awq4-g64": ("awq", 4, 64),
}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2",
       "GPTQMODEL_DISABLE_PACK_EXT": "1"}


def _hwm(pid: int) -> int:
    """The process's own peak RSS so far (VmHWM, bytes). Not ru_maxrss: Linux carries the parent's peak RSS into a
    forked child's ru_maxrss across exec, so a child of a big parent would report the parent's peak."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _measured(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run cmd in a fresh process; wall and CPU seconds from os.wait4, peak RSS from VmHWM polled every 0.2 s
    (a high-water mark, so polling misses nothing but the last 0.2 s). A run still going after `timeout` wall
    seconds is killed and recorded as not finished (with the CPU seconds it had used)."""
    t0 = time.monotonic()
    peak = 0
    with open(log, "w") as f:
        # cwd: GPTQModel writes a logs/ folder into the working directory
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **ENV, **(env or {})},
                             cwd=log.parent)
        while True:
            peak = max(peak, _hwm(p.pid))
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                status = "timeout"
                break
            time.sleep(0.2)
    wall = time.monotonic() - t0
    if status and status != "timeout":
        sys.exit(f"{' '.join(cmd[:4])} ... failed (status {status}); see {log}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_gib": peak / 2**30,
            "finished": status != "timeout"}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gptqmodel_worker(config: str, ids_file: str, model: str, out: str) -> None:
    """One GPTQModel quantization (in its own process), from the given token ids."""
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    method, bits, group = CONFIGS[config]
    ids = torch.load(ids_file)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    if method == "gptq":
        qcfg = QuantizeConfig(bits=bits, group_size=group, sym=True, desc_act=False, offload_to_disk=False)
        backend = BACKEND.AUTO
    else:
        qcfg = QuantizeConfig(bits=bits, group_size=group, sym=False, method=METHOD.AWQ, format=FORMAT.GEMM,
                              offload_to_disk=False)
        backend = BACKEND.AWQ_TORCH
    m = GPTQModel.load(model, qcfg, device="cpu")
    m.quantize(calib, batch_size=1, backend=backend)
    m.save(out)


def _score_all(models: dict, base, sets: dict) -> dict:
    """Every model against the bf16 `base` on every eval set, one window at a time (the bf16 forward runs once per
    window for all models): {model: {set: {"nll", "kl", "top1", "tokens"} summed}} plus the base's own "nll"
    under the key None. sets: {name: [n, T] int64 windows}."""
    import torch

    out = {m: {k: {"nll": 0.0, "kl": 0.0, "top1": 0, "tokens": 0} for k in sets} for m in [None, *models]}
    with torch.inference_mode():
        for k, windows in sets.items():
            for w in windows:
                ref = torch.log_softmax(base(w[None]).logits[0, :-1].float(), dim=-1)  # [T-1, V]
                for m, model in [(None, None), *models.items()]:
                    logp = ref if model is None else torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
                    o = out[m][k]
                    o["nll"] -= float(logp.gather(1, w[1:, None]).sum())
                    o["kl"] += float((ref.exp() * (ref - logp)).sum())
                    o["top1"] += int((ref.argmax(-1) == logp.argmax(-1)).sum())
                    o["tokens"] += len(w) - 1
    return out


def _rise(q: dict, b: dict) -> float:
    """PPL rise in % of summed stats q over the base's b (exp of the mean NLL difference)."""
    import math

    return 100 * (math.exp((q["nll"] - b["nll"]) / q["tokens"]) - 1)


def _pool(stats: dict, keys) -> dict:
    """Token-weighted pool of per-set sums over the sets `keys`."""
    return {f: sum(stats[k][f] for k in keys) for f in ("nll", "kl", "top1", "tokens")}


def heldout_sets(model_dir: str, seqlen: int, max_windows: int) -> dict:
    """eval/heldout.jsonl (sources the bundled calibration never draws on), one set per source: each source's
    documents joined by EOS and cut into consecutive windows, at most max_windows of them: {source: [n, T]}."""
    from collections import defaultdict

    from transformers import AutoTokenizer

    from inf_quant.data.calibrate import eval_windows, read_records, resolve_text_file

    tok = AutoTokenizer.from_pretrained(model_dir)
    by = defaultdict(list)
    for r in read_records(resolve_text_file("bundled-heldout")):
        by[r["source"]].append(r["text"])
    return {k: eval_windows(tok, v, seqlen)[:max_windows] for k, v in sorted(by.items())}


def _rtn_model(model_dir: str, method: str, bits: int, group: int):
    """The bf16 model with every decoder linear rounded to nearest on the grid the method writes."""
    import torch
    from transformers import AutoModelForCausalLM

    from inf_quant.quant.grid import dequantize_weight, rtn_quantize

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            q = rtn_quantize(mod.weight.data, bits, group, sym=method == "gptq")
            mod.weight.data = dequantize_weight(q)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["gptq4-g64"], choices=list(CONFIGS))
    ap.add_argument("--tools", nargs="*", default=["inf-quant", "gptqmodel"])
    ap.add_argument("--ours", nargs="*", default=[], metavar='NAME="ARGS"',
                    help="extra inf-quant variants (extra CLI args), e.g. damp05=\"--damp 0.05\"; "
                         "AWQ variants start with 'awq:', e.g. awqgptq=\"awq: --solve gptq\"")
    ap.add_argument("--tree", nargs="*", default=[], metavar='NAME="DIR [ARGS]"',
                    help="also run inf-quant from another checkout (e.g. a git worktree of an older commit), "
                         "with extra CLI args if given")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                    help="calibration seeds: each draws other windows, shared by every tool; tables give medians")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=12, help="windows of eval/ (the tuned-on sources' line)")
    ap.add_argument("--heldout-windows", type=int, default=12, help="windows per held-out source at most")
    ap.add_argument("--out", default="/tmp/inf-quant-peers")
    ap.add_argument("--no-rtn", action="store_true")
    ap.add_argument("--loader", choices=["dequantized", "transformers"], default="dequantized",
                    help="dequantized: inf_quant.evaluate.reference.load_dequantized (the weights the packed tensors "
                         "encode; tests/test_loader_exact.py holds it equal to gptqmodel's kernels); transformers: "
                         "from_pretrained through gptqmodel's CPU kernels (as users load it; ~10x slower here)")
    ap.add_argument("--score-dtype", choices=["bf16", "fp32"], default="bf16",
                    help="compute dtype of every scored forward, bf16 model and quantized alike (log-softmax in fp32)")
    ap.add_argument("--timeout", type=float, default=3600, help="wall seconds before a quantization is abandoned")
    ap.add_argument("--tables", nargs="+", metavar="RESULTS_JSON",
                    help="print one table from earlier runs' results.json (same seeds, samples, eval windows), "
                         "e.g. a run with GPTQModel and a later one with more inf-quant variants; runs nothing")
    ap.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        return gptqmodel_worker(*a._worker)
    if a.tables:
        runs = [json.loads(Path(f).read_text()) for f in a.tables]
        first = runs[0]
        if any(r["tokens"] != first["tokens"] or r["args"]["seeds"] != first["args"]["seeds"] for r in runs):
            sys.exit("--tables: the runs differ in eval tokens or seeds; their rows are not comparable")
        seen, rows = set(), []
        for r in runs:
            for row in r["rows"]:
                key = (row["tool"], row["config"], row["seed"])
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
        heldout = [k for k in first["tokens"] if k != "eval/ (tuned on)"]
        return print_table(rows, heldout, first["bf16_ppl"], first["tokens"], argparse.Namespace(**first["args"]))

    import torch
    from smollm2 import ensure_smollm2, eval_windows

    from inf_quant.core.config import CalibConfig, GPTQConfig, ModelConfig, OutputConfig, Recipe
    from inf_quant.pipeline import prepare

    model = str(ensure_smollm2())
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    tools = {t: [] for t in a.tools}
    tools.update({f"inf-quant {n}": shlex.split(v) for n, v in (o.split("=", 1) for o in a.ours)})
    trees = {f"inf-quant {n}": shlex.split(v) for n, v in (o.split("=", 1) for o in a.tree)}
    tools.update({n: v[1:] for n, v in trees.items()})
    trees = {n: str(Path(v[0]).resolve()) for n, v in trees.items()}
    runs: dict[tuple[str, str], list[dict]] = {}
    for seed in a.seeds:
        ids = prepare(Recipe(model=ModelConfig(path=model),
                             calibration=CalibConfig(samples=a.samples, seqlen=a.seqlen, seed=seed),
                             gptq=GPTQConfig(group_size=64), output=OutputConfig(dir=str(root / "never-written")))).ids
        ids_file = root / f"calib_ids_{seed}.pt"
        torch.save(ids, ids_file)
        for config in a.configs:  # tools alternate within each seed and config
            method, bits, group = CONFIGS[config]
            for tool, extra in tools.items():
                if tool != "gptqmodel" and extra and (extra[0] == "awq:") != (method == "awq"):
                    continue  # an --ours variant is for GPTQ unless its args start with "awq:"
                extra = extra[1:] if extra and extra[0] == "awq:" else extra
                out = root / f"{tool.replace(' ', '-')}-{config}-s{seed}"
                log = out.with_suffix(".log")
                if tool == "gptqmodel":
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", config, str(ids_file), model,
                           str(out)]
                else:
                    cmd = [sys.executable, "-m", "inf_quant", method, "--model", model, "--out", str(out), "--force",
                           "-q", "--samples", str(a.samples), "--seqlen", str(a.seqlen), "--seed", str(seed),
                           "--group-size", str(group), "--device", "cpu",
                           *(["--bits", str(bits)] if method == "gptq" else []), *extra]
                r = _measured(cmd, log, a.timeout, {"PYTHONPATH": trees[tool]} if tool in trees else {})
                r.update(size_bytes=_du(out), out=str(out), seed=seed)
                runs.setdefault((tool, config), []).append(r)
                print(f"[seed {seed}] {tool} {config}: {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU-s, "
                      f"{r['peak_rss_gib']:.2f} GiB{'' if r['finished'] else ', NOT FINISHED (timeout)'}", flush=True)

    from transformers import AutoModelForCausalLM

    sets = heldout_sets(model, a.seqlen, a.heldout_windows)
    heldout = list(sets)
    sets["eval/ (tuned on)"] = eval_windows(model, a.seqlen, a.eval_windows)
    from inf_quant.evaluate.reference import load_dequantized

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.score_dtype]
    models = {}
    for config in a.configs:
        method, bits, group = CONFIGS[config]
        if not a.no_rtn:
            models[("round-to-nearest", config, None)] = _rtn_model(model, method, bits, group).to(dtype)
        for (tool, c), rs in runs.items():
            for r in rs:
                if c == config and r["finished"]:
                    models[(tool, config, r["seed"])] = (
                        load_dequantized(r["out"], dtype) if a.loader == "dequantized" else
                        AutoModelForCausalLM.from_pretrained(r["out"], device_map="cpu", dtype=dtype,
                                                             trust_remote_code=True))
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    t0 = time.monotonic()
    stats = _score_all(models, base, sets)
    print(f"scored {len(models)} models on {sum(len(w) for w in sets.values())} windows in "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    rows = []
    for (tool, config, seed), st in ((k, v) for k, v in stats.items() if k is not None):
        row = {"tool": tool, "config": config, "seed": seed,
               "rise": {k: _rise(st[k], stats[None][k]) for k in sets},
               "kl": {k: st[k]["kl"] / st[k]["tokens"] for k in sets},
               "top1": {k: st[k]["top1"] / st[k]["tokens"] for k in sets}}
        pooled = _pool(st, heldout)
        row["rise"]["held-out pooled"] = _rise(pooled, _pool(stats[None], heldout))
        row["kl"]["held-out pooled"] = pooled["kl"] / pooled["tokens"]
        if seed is not None:
            row.update({k: v for k, v in next(r for r in runs[(tool, config)] if r["seed"] == seed).items()
                        if k in ("wall_s", "cpu_s", "peak_rss_gib", "size_bytes")})
        rows.append(row)
    base_ppl = {k: math.exp(stats[None][k]["nll"] / stats[None][k]["tokens"]) for k in sets}
    tokens = {k: stats[None][k]["tokens"] for k in sets}
    (root / "results.json").write_text(json.dumps({"bf16_ppl": base_ppl, "tokens": tokens, "rows": rows,
                                                   "args": vars(a)}, indent=1))
    print_table(rows, heldout, base_ppl, tokens, a)


def print_table(rows: list[dict], heldout: list[str], base_ppl: dict, tokens: dict, a) -> None:
    """Markdown: per config and tool, the PPL rise on each held-out source (median over seeds, the seeds' values
    in brackets when they differ), pooled, eval/, pooled KL, then median CPU s and peak RSS."""
    cols = [*heldout, "held-out pooled", "eval/ (tuned on)"]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores; calibration {a.samples} x "
          f"{a.seqlen} (same ids for every tool), seeds {a.seeds}; predicted tokens: "
          + ", ".join(f"{k} {tokens[k]}" for k in (*heldout, "eval/ (tuned on)"))
          + "; bf16 PPL: " + ", ".join(f"{k} {base_ppl[k]:.2f}" for k in (*heldout, "eval/ (tuned on)")) + "\n")
    print("PPL rise over bf16, median of the seeds [each seed]:\n")
    print("| config | tool | " + " | ".join(cols) + " | pooled KL | CPU s | peak RSS GiB |")
    print("|---|---|" + "---:|" * (len(cols) + 3))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["tool"]), []).append(r)
    for (config, tool), rs in groups.items():
        cells = []
        for c in cols:
            v = [r["rise"][c] for r in rs]
            each = f" [{' / '.join(f'{x:+.1f}' for x in v)}]" if len(v) > 1 else ""
            cells.append(f"{statistics.median(v):+.1f} %{each}")
        kl = statistics.median(r["kl"]["held-out pooled"] for r in rs)
        cpu = (f"{statistics.median(r['cpu_s'] for r in rs):.0f} | {statistics.median(r['peak_rss_gib'] for r in rs):.2f}"
               if "cpu_s" in rs[0] else " | ")
        print(f"| {config} | {tool} | " + " | ".join(cells) + f" | {kl:.4f} | {cpu} |")
    ref = {c: groups.get((c, "gptqmodel")) for c in {r["config"] for r in rows}}
    print("\nRatio of PPL rises, each tool's median over the seeds / GPTQModel's:\n")
    print("| config | tool | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for (config, tool), rs in groups.items():
        if not ref.get(config) or tool == "gptqmodel":
            continue
        cells = [statistics.median(r["rise"][c] for r in rs) / statistics.median(r["rise"][c] for r in ref[config])
                 for c in cols]
        print(f"| {config} | {tool} | " + " | ".join(f"{x:.2f} x" for x in cells) + " |")


if __name__ == "__main__":
    main()
