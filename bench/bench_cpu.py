"""CPU benchmark: wall time and peak RSS of quantizing the bundled model (the CI machine's workload).

    python bench/bench_cpu.py [--methods gptq4 gptq8 awq4] [--repeat 1]

Runs `inf-quant <method> --json` in a fresh process per run (so peak RSS is that run's) and prints a Markdown
table to paste into bench/RESULTS.md with the machine and date. Not a test: timings vary with machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CMDS = {"gptq4": ["gptq", "--bits", "4"], "gptq8": ["gptq", "--bits", "8"], "awq4": ["awq"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(CMDS), choices=list(CMDS))
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print("| method | wall s | pipeline s | peak RSS GiB | size MB | bits/weight |\n|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for m in a.methods:
            for r in range(a.repeat):
                out = Path(tmp) / f"{m}-{r}"
                t0 = time.monotonic()
                p = subprocess.run([sys.executable, "-m", "inf_quant", *CMDS[m], "--out", str(out), "--json"],
                                   capture_output=True, text=True, env=env)
                wall = time.monotonic() - t0
                if p.returncode:
                    sys.exit(p.stderr[-2000:])
                s = json.loads(p.stdout.strip().splitlines()[-1])
                print(f"| {m} | {wall:.1f} | {s['seconds']:.1f} | {s['peak_rss_bytes'] / 2**30:.2f} | "
                      f"{s['size_bytes'] / 1e6:.1f} | {s['bits_per_weight']:.3f} |")


if __name__ == "__main__":
    main()
