"""CPU per-phase profile of `inf-quant gptq` on a mid-size INF-shaped checkpoint, for two source trees side by side.

    git worktree add /tmp/before 17a0f89          # the code before issue 9
    python bench/cpu_phases.py --tree before=/tmp/before --tree after=. --repeat 2 --work /tmp/phases

Builds (once, into --work) a random-weight INF-architecture checkpoint with bench/gpu_probe.build (default: hidden
1024, FFN 2816, 16/2 heads, 4 layers), then runs each tree's own CLI (`gptq --bits 4`, 32 x 512 calibration) in a
fresh process per run, the trees alternating, repeat times, with bench/phases.py's timers (exclusive seconds per
phase; a name a tree lacks is skipped).

Prints one Markdown table: per tree, the median over repeats of each phase, wall, CPU seconds (user+sys of the
child) and peak RSS (the child's VmHWM), then after/before speed-ups. Not a test: timings vary with load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from phases import PHASES, install

def _child(a) -> None:
    sys.path.insert(0, str(Path(a.tree[0]).resolve()))
    from inf_quant import cli

    spent, peak = install()
    t0 = time.perf_counter()
    rc = cli.main(["gptq", "--bits", "4", "--model", a.model, "--out", a.out, "--samples", str(a.samples),
                   "--seqlen", str(a.seqlen), "--device", "cpu", "--force", "-q"])
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": hwm, "phases": spent,
                      "rss_by_phase": peak}))


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
    print("\nsampled peak RSS (GiB) inside each phase, last run of each tree:")
    print("| tree | " + " | ".join(PHASES + ["other"]) + " |")
    print("|---|" + "---:|" * (len(PHASES) + 1))
    for n, rs in runs.items():
        print(f"| {n} | " + " | ".join(f"{rs[-1]['rss_by_phase'][k] / 2**30:.2f}" for k in PHASES + ["other"]) + " |")


if __name__ == "__main__":
    main()
