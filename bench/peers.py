"""inf-quant against GPTQModel 7.6 on the real model (SmolLM2-135M-Instruct), side by side in one invocation.

    python bench/peers.py [--configs gptq4-g64 gptq4-g32 gptq8-g64 awq4-g64] [--repeat 2]
                          [--samples 16] [--seqlen 512] [--eval-windows 24] [--ours NAME="EXTRA CLI ARGS" ...]
                          [--tree NAME=CHECKOUT_DIR ...]

Both tools quantize the same bf16 checkpoint (bench/smollm2.py) from the same calibration token ids: inf-quant's
own windows of the bundled calibration set (`prepare(recipe).ids`), handed to GPTQModel as `input_ids`. Every
quantization runs in a fresh process, alternated (A B A B ...), measured with os.wait4: wall seconds, CPU seconds
(user + system) and peak RSS (the child's own VmHWM). Each output is then loaded *as users load it* (transformers `from_pretrained`,
gptqmodel's CPU kernels) and scored against the bf16 model on eval windows not used for calibration (the
bundled eval set): perplexity, exact full-vocabulary KL(bf16 || quantized) and top-1 agreement. A round-to-nearest
row (the same grid, no GPTQ/AWQ) is computed in-process as the floor every method must beat.
GPTQModel on CPU: GPTQMODEL_CPU_WORKERS=2, GPTQMODEL_DISABLE_PACK_EXT=1, offload_to_disk=False; AWQ with
backend=AWQ_TORCH and sym=False. Prints a Markdown table for bench/RESULTS.md and writes results.json.
Not a test: timings move with machine load; alternation puts both tools under the same load.
"""

from __future__ import annotations

import argparse
import json
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


def _scores(model, windows, ref_logp=None) -> tuple[dict, object]:
    """PPL of model on windows; with ref_logp ([n, T-1, V] fp32 of bf16) also exact KL and top-1."""
    import torch

    nll, kl, top1, count, logps = 0.0, 0.0, 0, 0, []
    with torch.no_grad():
        for i, w in enumerate(windows):
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1)  # [T-1, V]
            nll -= float(logp.gather(1, w[1:, None]).sum())
            count += len(w) - 1
            if ref_logp is None:
                logps.append(logp.to(torch.bfloat16))
            else:
                ref = ref_logp[i].float()
                kl += float((ref.exp() * (ref - logp)).sum())
                top1 += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    out = {"ppl": float(torch.tensor(nll / count).exp())}
    if ref_logp is not None:
        out.update(kl=kl / count, top1=top1 / count)
    return out, logps


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
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--tools", nargs="+", default=["inf-quant", "gptqmodel"])
    ap.add_argument("--ours", nargs="*", default=[], metavar='NAME="ARGS"',
                    help="extra inf-quant variants (extra CLI args), e.g. damp05=\"--damp 0.05\"; "
                         "AWQ variants start with 'awq:', e.g. awqgptq=\"awq: --solve gptq\"")
    ap.add_argument("--tree", nargs="*", default=[], metavar="NAME=DIR",
                    help="also run inf-quant from another checkout (e.g. a git worktree of an older commit)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--out", default="/tmp/inf-quant-peers")
    ap.add_argument("--no-rtn", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600, help="wall seconds before a quantization is abandoned")
    ap.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        return gptqmodel_worker(*a._worker)

    import torch
    from smollm2 import ensure_smollm2, eval_windows

    from inf_quant.config import CalibConfig, GPTQConfig, ModelConfig, OutputConfig, Recipe
    from inf_quant.pipeline import prepare

    model = str(ensure_smollm2())
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    ids = prepare(Recipe(model=ModelConfig(path=model), calibration=CalibConfig(samples=a.samples, seqlen=a.seqlen),
                         gptq=GPTQConfig(group_size=64),
                         output=OutputConfig(dir=str(root / "never-written")))).ids
    ids_file = root / "calib_ids.pt"
    torch.save(ids, ids_file)
    tools = {t: [] for t in a.tools}
    tools.update({f"inf-quant {n}": shlex.split(v) for n, v in (o.split("=", 1) for o in a.ours)})
    trees = {f"inf-quant {n}": str(Path(v).resolve()) for n, v in (o.split("=", 1) for o in a.tree)}
    tools.update({n: [] for n in trees})
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(a.repeat):
        for config in a.configs:
            method, bits, group = CONFIGS[config]
            for tool, extra in tools.items():
                if tool != "gptqmodel" and extra and (extra[0] == "awq:") != (method == "awq"):
                    continue  # an --ours variant is for GPTQ unless its args start with "awq:"
                extra = extra[1:] if extra and extra[0] == "awq:" else extra
                out = root / f"{tool.replace(' ', '-')}-{config}-{rep}"
                log = out.with_suffix(".log")
                if tool == "gptqmodel":
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", config, str(ids_file), model, str(out)]
                else:
                    cmd = [sys.executable, "-m", "inf_quant", method, "--model", model, "--out", str(out), "--force",
                           "-q", "--samples", str(a.samples), "--seqlen", str(a.seqlen), "--group-size", str(group),
                           "--device", "cpu", *(["--bits", str(bits)] if method == "gptq" else []), *extra]
                r = _measured(cmd, log, a.timeout, {"PYTHONPATH": trees[tool]} if tool in trees else {})
                r.update(size_bytes=_du(out), out=str(out))
                runs.setdefault((tool, config), []).append(r)
                print(f"[{rep}] {tool} {config}: {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU-s, "
                      f"{r['peak_rss_gib']:.2f} GiB{'' if r['finished'] else ', NOT FINISHED (timeout)'}", flush=True)

    from transformers import AutoModelForCausalLM

    from inf_quant.report import signed_pct

    windows = eval_windows(model, a.seqlen, a.eval_windows)
    base, ref = _scores(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), windows)
    ref = torch.stack(ref)
    rows = []
    for config in a.configs:
        method, bits, group = CONFIGS[config]
        if not a.no_rtn:
            s, _ = _scores(_rtn_model(model, method, bits, group), windows, ref)
            rows.append({"tool": "round-to-nearest", "config": config, **s})
        for tool in tools:
            if (tool, config) not in runs:
                continue
            rs = runs[(tool, config)]
            if not all(r["finished"] for r in rs):
                rows.append({"tool": tool, "config": config, "unfinished": rs})
                continue
            q = AutoModelForCausalLM.from_pretrained(rs[0]["out"], device_map="cpu", dtype=torch.float32,
                                                     trust_remote_code=True)
            s, _ = _scores(q, windows, ref)
            del q
            med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_gib")}
            rows.append({"tool": tool, "config": config, **s, **med, "size_bytes": rs[0]["size_bytes"],
                         "runs": rs})
    for r in rows:
        if "ppl" in r:
            r["ppl_rise_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
    (root / "results.json").write_text(json.dumps({"bf16": base, "rows": rows, "args": vars(a)}, indent=1))
    n_tok = windows.numel() - len(windows)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"calibration {a.samples} x {a.seqlen} (same ids), eval {len(windows)} x {a.seqlen} "
          f"({n_tok} predicted tokens), bf16 PPL {base['ppl']:.3f}; medians of {a.repeat} alternated runs\n")
    print("| config | tool | PPL | rise | KL | top-1 | wall s | CPU s | peak RSS GiB | size MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "unfinished" in r:
            u = r["unfinished"][0]
            print(f"| {r['config']} | {r['tool']} | did not finish: killed after {u['wall_s']:.0f} s wall, "
                  f"{u['cpu_s']:.0f} CPU-s | | | | | | | |")
            continue
        t = (f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_gib']:.2f} | {r['size_bytes'] / 1e6:.1f}"
             if "wall_s" in r else "| | |")
        print(f"| {r['config']} | {r['tool']} | {r['ppl']:.3f} | {signed_pct(r['ppl_rise_pct'], 1)} | {r['kl']:.4f} | "
              f"{100 * r['top1']:.1f} % | {t} |")


if __name__ == "__main__":
    main()
