"""CPU per-phase profile of `inf-quant gptq` on a mid-size INF-shaped checkpoint, for two source trees side by side.

    git worktree add /tmp/before 17a0f89          # the code before issue 9
    python bench/cpu_phases.py --tree before=/tmp/before --tree after=. --repeat 2 --work /tmp/phases

Builds (once, into --work) a random-weight INF-architecture checkpoint with bench/gpu_probe.build (default: hidden
1024, FFN 2816, 16/2 heads, 4 layers), then runs each tree's own CLI (`gptq --bits 4`, 32 x 512 calibration) in a
fresh process per run, the trees alternating, repeat times. The child wraps the pipeline's functions (by name; a
name a tree lacks is skipped) with timers that count exclusive seconds, so nested phases are not double-counted:

    read     load.load_block (shards -> one decoder layer)
    forward  the layer forwards (capture_inputs, forward_all, the per-half runs), less the Hessian hooks inside them
    hessian  accumulate_hessian
    factor   the damped Cholesky / inverse
    columns  the blocked column loop (_solve)
    setup    the rest of gptq_quantize (copies, permutation, static qparams)
    pack     to_tensors + from_tensors (pack the codes, unpack the dequantized weight for propagation)
    write    saving finished layers and publishing the checkpoint

Prints one Markdown table: per tree, the median over repeats of each phase, wall, CPU seconds (user+sys of the
child) and peak RSS (the child's VmHWM), then after/before speed-ups. Not a test: timings vary with load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = ["read", "forward", "hessian", "factor", "columns", "setup", "pack", "write"]
# (module, attribute, phase); every module that imported the function by name is patched too
TARGETS = [
    ("inf_quant.load", "load_block", "read"),
    ("inf_quant.pipeline", "capture_inputs", "forward"), ("inf_quant.forward", "capture_inputs", "forward"),
    ("inf_quant.pipeline", "forward_all", "forward"), ("inf_quant.forward", "forward_all", "forward"),
    ("inf_quant.pipeline", "_run_half_all", "forward"), ("inf_quant.forward", "run_half_all", "forward"),
    ("inf_quant.quant.gptq", "accumulate_hessian", "hessian"),
    ("inf_quant.quant.gptq", "_damped_hinv_", "factor"),
    ("inf_quant.quant.gptq", "_solve", "columns"),
    ("inf_quant.quant.gptq", "gptq_quantize", "setup"),
    ("inf_quant.qformat", "to_tensors", "pack"), ("inf_quant.qformat", "from_tensors", "pack"),
    ("inf_quant.output", "publish", "write"),
]


def _child(a) -> None:
    sys.path.insert(0, str(Path(a.tree[0]).resolve()))
    import importlib

    import inf_quant.output as output
    from inf_quant import cli

    spent = dict.fromkeys(PHASES, 0.0)
    stack: list[list] = []  # [phase, start, seconds of nested timed calls]

    def timed(fn, phase):
        def wrapper(*args, **kw):
            stack.append([phase, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kw)
            finally:
                ph, t0, inner = stack.pop()
                total = time.perf_counter() - t0
                spent[ph] += total - inner
                if stack:
                    stack[-1][2] += total
        wrapper.__wrapped__ = fn
        return wrapper

    originals = {}
    for mod_name, attr, phase in TARGETS:
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(mod_name)
            if hasattr(mod, attr) and (mod_name, attr) not in originals:
                originals[(mod_name, attr)] = (getattr(mod, attr), phase)
    wrapped = {id(fn): timed(fn, phase) for fn, phase in originals.values()}
    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("inf_quant") and m is not None]:
        for attr, val in list(vars(mod).items()):
            if callable(val) and id(val) in wrapped:
                setattr(mod, attr, wrapped[id(val)])
    save = output.WorkDir.save_layer
    output.WorkDir.save_layer = timed(save, "write")
    t0 = time.perf_counter()
    rc = cli.main(["gptq", "--bits", "4", "--model", a.model, "--out", a.out, "--samples", str(a.samples),
                   "--seqlen", str(a.seqlen), "--device", "cpu", "--force", "-q"])
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": hwm, "phases": spent}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR", help="a source tree to run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/inf-quant-phases"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(a)
    trees = dict(t.split("=", 1) for t in a.tree) or {"here": "."}
    model = a.work / f"inf-h{a.hidden}-f{a.ffn}-l{a.layers}"
    if not (model / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_probe import build

        build(model, a)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    runs: dict[str, list[dict]] = {n: [] for n in trees}
    for r in range(a.repeat):
        for name, tree in trees.items():
            cmd = [sys.executable, __file__, "--child", "--tree", tree, "--model", str(model),
                   "--out", str(a.work / f"out-{name}"), "--samples", str(a.samples), "--seqlen", str(a.seqlen)]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": str(Path(tree).resolve())})
            if p.returncode:
                sys.exit(f"{name}: rc {p.returncode}\n{p.stderr[-3000:]}")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"# run {r + 1}/{a.repeat} {name}: {runs[name][-1]['wall']:.1f} s", file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(x["phases"][k] for x in rs) for k in PHASES} |
           {k: statistics.median(x[k] for x in rs) for k in ("wall", "cpu", "rss")} for n, rs in runs.items()}
    cols = PHASES + ["wall", "cpu"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}; "
          f"{a.layers} layers, hidden {a.hidden}, FFN {a.ffn}, {a.heads}/{a.kv_heads} heads, "
          f"{a.samples}x{a.seqlen} calibration; median of {a.repeat}, alternated")
    print("| tree | " + " | ".join(f"{c} s" for c in cols) + " | peak RSS GiB |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for n, m in med.items():
        print(f"| {n} | " + " | ".join(f"{m[c]:.2f}" for c in cols) + f" | {m['rss'] / 2**30:.2f} |")
    names = list(med)
    if len(names) == 2:
        b, f = med[names[0]], med[names[1]]
        print(f"| {names[0]}/{names[1]} | " + " | ".join(f"{b[c] / f[c]:.2f}x" if f[c] > 0.005 else "-"
                                                           for c in cols) + f" | {f['rss'] / b['rss']:.2f} |")


if __name__ == "__main__":
    main()
