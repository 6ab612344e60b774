"""Exclusive per-phase timers for inf-quant's pipeline, by wrapping its functions by name (bench/cpu_phases.py,
bench/gpu_probe.py). A name a source tree lacks is skipped, so two trees (before / after a change) can be timed by
the same code; nested timed calls are not double-counted. With sync (CUDA), every timed call ends with
torch.cuda.synchronize(), so a phase owns the kernels it launched.

    read     load.load_block (shards -> one decoder layer); after issue 9's read-ahead, LayerReader.block: the wait
             for the background read + building the module

    forward  the layer forwards (capture_inputs, forward_all, the per-half runs), less the Hessian hooks inside them
    hessian  accumulate_hessian (before issue 9), hessian_add_ + hessian_finish_
    factor   the damped Cholesky / inverse
    columns  the blocked column loop (_solve)
    setup    the rest of gptq_quantize (copies, permutation, static qparams)
    pack     to_tensors + from_tensors (pack the codes, unpack the dequantized weight for propagation)
    write    saving finished layers and publishing the checkpoint; with the background writer, LayerWriter.save:
             the host copy + the wait for the previous layer's write
Only the main thread is timed: the read-ahead and write-behind threads' work overlaps the phases above.
    awq      AWQ's scale and clip searches (awq_block)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time

PHASES = ["read", "forward", "hessian", "factor", "columns", "setup", "pack", "write", "awq"]
# (module, attribute, phase); every module that imported the function by name is patched too
TARGETS = [
    ("inf_quant.read.load", "load_block", "read"),
    ("inf_quant.pipeline", "capture_inputs", "forward"), ("inf_quant.engine.forward", "capture_inputs", "forward"),
    ("inf_quant.pipeline", "forward_all", "forward"), ("inf_quant.engine.forward", "forward_all", "forward"),
    ("inf_quant.pipeline", "_run_half_all", "forward"), ("inf_quant.engine.forward", "run_half_all", "forward"),
    ("inf_quant.quant.gptq", "accumulate_hessian", "hessian"),
    ("inf_quant.quant.gptq", "hessian_add_", "hessian"), ("inf_quant.quant.gptq", "hessian_finish_", "hessian"),
    ("inf_quant.quant.gptq", "_damped_hinv_", "factor"),
    ("inf_quant.quant.gptq", "_solve", "columns"),
    ("inf_quant.quant.gptq", "gptq_quantize", "setup"),
    ("inf_quant.quant.qformat", "to_tensors", "pack"), ("inf_quant.quant.qformat", "from_tensors", "pack"),
    ("inf_quant.save.output", "publish", "write"),
    ("inf_quant.engine.awq_block", "awq_block", "awq"),
]




def install(sync: bool = False, sample_rss: bool = True) -> tuple[dict, dict]:
    """Wrap the pipeline's functions (import inf_quant first): (seconds per phase, sampled peak RSS per phase),
    both filled in as the pipeline runs."""
    import inf_quant.save.output as output

    spent = dict.fromkeys(PHASES, 0.0)
    stack: list[list] = []  # [phase, start, seconds of nested timed calls]

    def timed(fn, phase):
        def wrapper(*args, **kw):
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kw)
            stack.append([phase, time.perf_counter(), 0.0])
            try:
                out = fn(*args, **kw)
                if sync:
                    import torch

                    torch.cuda.synchronize()
                return out
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
    peak = dict.fromkeys(PHASES + ["other"], 0)   # the RSS high-water mark seen inside each phase, sampled
    page = os.sysconf("SC_PAGE_SIZE")

    def sample():
        with open("/proc/self/statm") as f:
            while True:
                f.seek(0)
                rss = int(f.read().split()[1]) * page
                ph = stack[-1][0] if stack else "other"
                peak[ph] = max(peak[ph], rss)
                time.sleep(0.002)

    if sample_rss:
        threading.Thread(target=sample, daemon=True).start()
    output.WorkDir.save_layer = timed(output.WorkDir.save_layer, "write")
    load = importlib.import_module("inf_quant.read.load")
    for cls, attr, phase in ((getattr(output, "LayerWriter", None), "save", "write"),
                             (getattr(load, "LayerReader", None), "block", "read")):
        if cls is not None:
            setattr(cls, attr, timed(getattr(cls, attr), phase))
    return spent, peak
