"""`inf-quant`: parse flags -> Recipe -> pre-flight -> one library call -> exit code. Nothing else.

Exit codes: 0 success; 1 a verification gate failed; 2 bad input or environment, out of memory, disk full (one
line on stderr: what, where, how to fix); 3 an unexpected error (one line; the traceback goes to a log file whose
path is printed); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM; like Ctrl-C, the lock released and the
work directory kept for --resume). Arguments and pre-flight (preflight.py) are checked before torch or
transformers is imported; library output is kept off the terminal (and in the crash log) unless --verbose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import __version__
from .console import crash_log, environment_advice, library_stdout, one_line, sigterm_as_interrupt, terminal

EXAMPLES = """examples:
  inf-quant gptq --bits 4                           # the bundled model -> out/inf-tiny-gptq-w4g128
  inf-quant gptq --bits 8 --model /models/INF-34B-Chat --out /releases/inf34b-gptq-w8g128 --device cuda
  inf-quant gptq --bits 4 --order act --damp 0.02 --samples 256 --seqlen 2048 --json
  inf-quant awq --model /models/INF-34B-Chat --out /releases/inf34b-awq-w4g128
  inf-quant gptq --bits 4 --out out/x --resume       # continue an interrupted run (same bytes as uninterrupted)
  inf-quant gptq --bits 4 --serve-as stablelm        # loads in vLLM/SGLang/transformers without remote code
  inf-quant export --as stablelm out/inf-tiny-gptq-w4g128 out/inf-tiny-gptq-w4g128-stablelm
"""

def _quant_args(p: argparse.ArgumentParser, bits: tuple[int, ...]) -> None:
    p.add_argument("--model", help="bf16 checkpoint directory (default: the bundled models/inf-tiny)")
    p.add_argument("--out", help="output directory (default: out/<model>-<method>-w<bits>g<group>)")
    p.add_argument("--bits", type=int, choices=bits, help=f"weight bits (default {bits[0]})")
    p.add_argument("--group-size", type=int, help="columns per scale/zero; -1 = per-channel (default 128)")
    p.add_argument("--calib", help="bundled (default: plain text), bundled-chat, bundled-mix (both), or a .jsonl "
                   "({'text': ...} or {'messages': [...]} per line) or .txt file")
    p.add_argument("--samples", type=int, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default min(2048, max_position_embeddings))")
    p.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")
    p.add_argument("--device", metavar="{auto,cpu,cuda,cuda:N}",
                   help="compute device (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"],
                   help="forward compute dtype (default auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--forward-batch", type=int, help="calibration samples per forward chunk (default 4)")
    p.add_argument("--unproven-cuda", nargs="+", choices=["bf16-hessian", "graph-columns"], metavar="PATH",
                   help="switch on CUDA-only paths no GPU run has proven yet (bf16-hessian, graph-columns); "
                        "recorded in the output's recipe; default: none")
    p.add_argument("--skip", nargs="+", metavar="MODULE",
                   help="linears left in bf16: 'mlp.down_proj' (every layer) or, awq only, "
                        "'model.layers.0.mlp.down_proj'")
    p.add_argument("--shard-gb", type=float, help="max safetensors shard size in GB (default 5)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")
    _serve_as_arg(p)
    p.add_argument("--allow-pickle", action="store_true", help="accept torch pickle (.bin/.pt) weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the libraries' own log lines and warnings (hidden by default)")
    p.add_argument("--log-dir", help="where a crash log goes (default $INF_QUANT_LOG_DIR, else "
                                     "~/.cache/inf-quant/logs; the temporary directory if that cannot be written)")


def _serve_as_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve-as", choices=["inflm", "stablelm"],
                   help="output layout of an INF model: inflm (default; remote code, as INF ships it) or stablelm "
                        "(transformers/vLLM/SGLang load it natively, fast tokenizer)")


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (exit 2), pointing at --help instead of printing the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="inf-quant", description="Quantize INF-34B (and Llama) checkpoints to GPTQ/AWQ, verify and release them.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"inf-quant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("gptq", help="GPTQ 4/8-bit quantization", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _quant_args(g, (4, 8))
    g.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None, help="symmetric grid (default on)")
    g.add_argument("--order", choices=["group-aware", "natural", "act"],
                   help="column solve order (default group-aware; 'act' = desc_act, not Marlin-friendly unless "
                        "--static-groups)")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="with --order act: fix group qparams up front so g_idx stays i // G (default off)")
    g.add_argument("--clip-steps", type=int, help="range-shrink candidates per group searched for the least "
                                                   "error; 0 = plain min/max (default: see README)")
    g.add_argument("--damp", type=float, help="damping, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--clip-norm", type=float, help="the range search's error norm p: sum |w - q|^p (default 2.4)")
    g.add_argument("--clip-weight", action=argparse.BooleanOptionalAction, default=None,
                   help="weigh each column's error in the range search by diag(H) (default off)")
    g.add_argument("--smooth", choices=["none", "awq"],
                   help="awq: AWQ's activation-aware scales folded into the norms/linears before the GPTQ solve; "
                        "the output stays plain GPTQ v1 (default none)")
    g.add_argument("--lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="also quantize the lm_head (default off; INF layout only: vLLM with integrations/vllm, "
                        "transformers through the copied modeling code)")
    a = sub.add_parser("awq", help="AWQ 4-bit quantization (gemm format)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _quant_args(a, (4,))
    a.add_argument("--solve", choices=["rtn", "gptq"],
                   help="after the scales: gptq (default) = a GPTQ solve of the scaled weights, same AWQ gemm "
                        "format; rtn = AutoAWQ's clip search + round to nearest")
    v = sub.add_parser("verify", help="accuracy and VRAM gates of a quantized checkpoint against its bf16 baseline",
                       description="Exit 0: every gate passed; 1: a gate failed (named); 2: bad input.")
    v.add_argument("quantized", help="the quantized checkpoint directory")
    v.add_argument("--baseline", help="its bf16 source checkpoint (default: the bundled models/inf-tiny)")
    v.add_argument("--eval", help="'bundled-eval' (default) or a .jsonl ({'text', 'lang'} per line) / .txt file")
    v.add_argument("--seqlen", type=int, help="tokens per eval window (default 512)")
    v.add_argument("--max-windows", type=int, help="evaluate an evenly spaced subset of windows (default: all)")
    v.add_argument("--top-k", type=int, help="baseline log-probs kept per position, the KL support (default 32)")
    v.add_argument("--baseline-gib", type=float, help="hidden states per pass of the layer-streamed baseline "
                                                      "(default 2; more windows take more passes, not more memory)")
    v.add_argument("--max-ppl-increase-pct", type=float, help="gate (default 3.0), per domain and overall")
    v.add_argument("--max-kl", type=float, help="gate on mean KL(bf16||quantized) in nats (default 0.05)")
    v.add_argument("--min-top1-agreement", type=float, help="gate (default 0.90)")
    v.add_argument("--vram-gib", type=float, help="GPU memory budget for the fit verdict (default 24)")
    v.add_argument("--context", type=int, help="context for the fit verdict (default: max_position_embeddings)")
    v.add_argument("--kv-dtype", choices=["fp16", "bf16", "fp8"], help="KV cache dtype (default fp16)")
    v.add_argument("--report", help="directory for verify.json/report.md (default: the quantized directory)")
    v.add_argument("--cache-dir", help="baseline cache (default ~/.cache/inf-quant)")
    v.add_argument("--device", metavar="{auto,cpu,cuda,cuda:N}", help="default: cuda if available")
    v.add_argument("--json", action="store_true", help="print verify.json instead of the summary")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    v.add_argument("--trust-remote-code", action="store_true", help="run the checkpoints' own Python code")
    f = sub.add_parser("fit", help="analytic VRAM verdict: does a checkpoint fit a card, and at what context",
                       description="Exit 0 if it fits at the given context, 1 if it does not, 2 on bad input.")
    f.add_argument("model", help="checkpoint directory (bf16, GPTQ or AWQ); only headers are read")
    f.add_argument("--vram-gib", type=float, default=24.0, help="GPU memory budget in GiB (default 24)")
    f.add_argument("--context", type=int, help="tokens of context (default: max_position_embeddings)")
    f.add_argument("--engine", choices=["vllm", "transformers"], default="vllm",
                   help="vllm (default): vLLM 0.32's accounting, chunked prefill, KV in 16-token blocks, the "
                        "largest --max-model-len and a ready `vllm serve` command; transformers: generate() with "
                        "one-shot prefill")
    f.add_argument("--kv-dtype", choices=["auto", "fp16", "bf16", "fp8"],
                   help="KV cache dtype (default: vllm auto = the model's bf16; transformers fp16)")
    f.add_argument("--batch", type=int, default=1, help="transformers: sequences decoded together (default 1)")
    f.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: fraction of the card (0.9)")
    f.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="vllm: prefill chunk, the profile run's size (2048: the OpenAI server's default here)")
    f.add_argument("--max-num-seqs", type=int, default=256, help="vllm: concurrent sequences (256)")
    f.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs (frees their pool)")
    f.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs the model is split over (1)")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    r = sub.add_parser("release", help="regenerate, verify and publish every release variant from recipes",
                       description="Exit 0: every variant passed and was published; 1: a gate failed (or --check "
                                   "found a changed file); 2: bad input.")
    r.add_argument("--recipes", help="directory of recipe YAML files (e.g. recipes/ or recipes/ci/)")
    r.add_argument("--out", help="release directory")
    r.add_argument("--model", help="bf16 checkpoint for every recipe (default: each recipe's model.path)")
    r.add_argument("--only", nargs="+", default=(), metavar="NAME", help="build only these recipes")
    r.add_argument("--resume", action="store_true", help="continue an interrupted release")
    r.add_argument("--force", action="store_true", help="rebuild variants that are already published")
    r.add_argument("--check", metavar="RELEASE_DIR", help="re-hash a release against its manifest.json")
    r.add_argument("--json", action="store_true", help="print the manifest (or the --check result) as JSON")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _serve_as_arg(r)
    x = sub.add_parser("export", help="rewrite an inflm checkpoint (bf16, GPTQ or AWQ) in a serving layout",
                       description="Same tensors (hard links) and INF's exact fast tokenizer (tokenizer.json). "
                                   "stablelm: config.json as model_type stablelm in INF's settings, no remote code; "
                                   "inflm: INF's own layout, e.g. the original bf16 checkpoint made servable in vLLM. "
                                   "Exit 0 on success, 2 on bad input.")
    x.add_argument("--as", dest="layout", required=True, choices=["stablelm", "inflm"], help="target layout")
    x.add_argument("src", help="the inflm checkpoint directory")
    x.add_argument("out", help="the new directory")
    x.add_argument("--force", action="store_true", help="replace an existing output directory")
    x.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    for p in (g, a, v, f, r, x):
        _verbose_arg(p)
    return parser


def _given(**kw) -> dict:
    """The flags the user actually passed (defaults live in the config dataclasses, not in argparse)."""
    return {k: v for k, v in kw.items() if v is not None}


def recipe_from_args(args: argparse.Namespace):
    from .config import (AWQConfig, CalibConfig, CudaPath, DType, GPTQConfig, Layout, Method, ModelConfig, Order,
                         OutputConfig, Recipe, RunConfig, Smooth, WeightSolve, parse_device)

    method = Method(args.command)
    q = _given(bits=args.bits, group_size=args.group_size)
    if method is Method.AWQ:
        q.update(_given(solve=WeightSolve(args.solve) if args.solve else None))
    if method is Method.GPTQ:
        q.update(_given(sym=args.sym, order=Order(args.order) if args.order else None,
                        static_groups=args.static_groups, damp=args.damp, clip_steps=args.clip_steps,
                        lm_head=args.lm_head, smooth=Smooth(args.smooth) if args.smooth else None,
                        clip_norm=args.clip_norm, clip_weight=args.clip_weight))
    return Recipe(
        method=method,
        model=ModelConfig(path=args.model or "bundled", trust_remote_code=args.trust_remote_code,
                          allow_pickle=args.allow_pickle),
        calibration=CalibConfig(**_given(source=args.calib, samples=args.samples, seqlen=args.seqlen, seed=args.seed)),
        gptq=GPTQConfig(**q) if method is Method.GPTQ else GPTQConfig(),
        awq=AWQConfig(**q) if method is Method.AWQ else AWQConfig(),
        run=RunConfig(**_given(device=parse_device(args.device)[0] if args.device else None,
                             gpu=parse_device(args.device)[1] if args.device else None,
                             dtype=DType(args.dtype) if args.dtype else None, forward_batch=args.forward_batch,
                             unproven_cuda=tuple(map(CudaPath, args.unproven_cuda)) if args.unproven_cuda else None)),
        skip=tuple(args.skip or ()),
        output=OutputConfig(**_given(dir=args.out, shard_gb=args.shard_gb,
                                     serve_as=Layout(args.serve_as) if args.serve_as else None),
                            force=args.force, resume=args.resume),
    )


class _Progress:
    """tqdm bar over layers: layer i/N, elapsed, ETA, per-layer error, peak RAM/VRAM."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, r, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        from .memory import gib

        if self.bar is None:
            self.bar = tqdm(total=total, desc="layers", unit="layer", file=sys.stderr, dynamic_ncols=True)
        err = max(r.losses.values()) if r.losses else 0.0
        post = {"err": "resumed" if r.resumed else f"{err:.3g}", "RAM": gib(r.peak_rss)}
        if r.peak_vram:
            post["VRAM"] = gib(r.peak_vram)
        post["VRAM" if r.peak_vram else "RAM"] += f" (expected {gib(r.expected)})"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)
        if r.index == total - 1:
            self.bar.close()
            self.bar = None


class _PhaseProgress:
    """tqdm bar per phase of `verify`: the baseline (layers x passes), then the scoring (windows), with RSS."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.phase = quiet, None, None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        from .memory import gib, rss_bytes

        if phase != self.phase:
            if self.bar is not None:
                self.bar.close()
            unit = "layer" if phase == "baseline" else "window"
            self.bar = tqdm(total=total, desc=phase, unit=unit, file=sys.stderr, dynamic_ncols=True)
            self.phase = phase
        self.bar.set_postfix({"RAM": gib(rss_bytes())}, refresh=False)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()
            self.bar, self.phase = None, None


def _quantize(args) -> int:
    from . import preflight

    from .lock import output_lock

    t0 = time.monotonic()
    recipe = recipe_from_args(args)
    plan = preflight.for_quantize(recipe)  # before torch is imported
    with output_lock(plan.out_dir):  # a second run on this output is refused now, not after tokenizing
        from .pipeline import quantize_locked

        with library_stdout(args):
            report = quantize_locked(recipe, plan, _Progress(args.quiet or args.json), t0)
    print(json.dumps(report.summary(), sort_keys=True) if args.json else report.to_text())
    return 0


def verify_config_from_args(args):
    from .config import Device, Gates, VerifyConfig, parse_device

    return VerifyConfig(quantized=args.quantized, baseline=args.baseline or "bundled", trust_remote_code=args.trust_remote_code,
                        gates=Gates(**_given(max_ppl_increase_pct=args.max_ppl_increase_pct, max_kl=args.max_kl,
                                           min_top1_agreement=args.min_top1_agreement)),
                        device=parse_device(args.device)[0] if args.device else Device.AUTO,
                        gpu=parse_device(args.device)[1] if args.device else 0,
                        **_given(eval=args.eval, seqlen=args.seqlen, max_windows=args.max_windows, vram_gib=args.vram_gib,
                               context=args.context, kv_dtype=args.kv_dtype, report_dir=args.report,
                               cache_dir=args.cache_dir, top_k=args.top_k, baseline_gib=args.baseline_gib))


def _verify(args) -> int:
    from . import preflight

    cfg = verify_config_from_args(args)
    plan = preflight.for_verify(cfg)

    from .verify import verify

    with library_stdout(args):
        report = verify(cfg, progress=_PhaseProgress(args.quiet or args.json), plan=plan)
    print(json.dumps(report.data, sort_keys=True) if args.json else report.to_text())
    return 0 if report.passed else 1


def _fit(args) -> int:
    from .errors import ConfigError

    if args.engine == "transformers":
        from .fit import fit_checkpoint

        if args.kv_dtype == "auto":
            raise ConfigError("--kv-dtype auto is vLLM's; with --engine transformers pass fp16, bf16 or fp8")
        report = fit_checkpoint(args.model, args.vram_gib, args.context, args.batch, args.kv_dtype or "fp16")
        print(json.dumps(report.to_dict(), sort_keys=True) if args.json else report.to_text())
        return 0 if report.fits else 1
    from .fit_vllm import VllmSettings, answer

    kv = "auto" if args.kv_dtype in (None, "fp16", "bf16") else args.kv_dtype  # vLLM's cache: the model dtype or fp8
    settings = VllmSettings(args.gpu_memory_utilization, kv, args.enforce_eager, args.max_num_batched_tokens,
                            args.max_num_seqs, args.tensor_parallel_size)
    fits, text = answer(args.model, args.vram_gib, args.context, settings, args.json)
    print(text)
    return 0 if fits else 1


def _release(args) -> int:
    from .config import Layout
    from .errors import ConfigError
    from .release import check, release

    if args.check:
        problems = check(args.check)
        print(json.dumps({"ok": not problems, "problems": problems}) if args.json else
              "\n".join(problems) or f"{args.check}: every file matches manifest.json")
        return 1 if problems else 0
    if not (args.recipes and args.out):
        raise ConfigError("release needs --recipes DIR and --out DIR (or --check RELEASE_DIR)")
    with library_stdout(args):
        report = release(args.recipes, args.out, args.model, tuple(args.only), args.resume, args.force,
                         progress=_Progress(args.quiet or args.json),
                         serve_as=Layout(args.serve_as) if args.serve_as else None)
    print(json.dumps(report.manifest, sort_keys=True) if args.json else report.to_text())
    return 0 if report.ok else 1


def _export(args) -> int:
    from . import preflight

    checked = preflight.for_export(args.src, args.out, args.force)

    from .config import Layout
    from .export import export_layout

    report = export_layout(args.src, args.out, Layout(args.layout), args.force, checked)
    print(json.dumps(report.summary(), sort_keys=True) if args.json else report.to_text())
    return 0


COMMANDS = {"gptq": _quantize, "awq": _quantize, "verify": _verify, "fit": _fit,
            "release": _release, "export": _export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with terminal(getattr(args, "verbose", False)), sigterm_as_interrupt():
        return _run(args, argv)


def _oom_advice(args) -> str:
    """The flags that size a command's memory."""
    if args.command == "verify":
        return "lower --baseline-gib or --seqlen, or use a machine with more memory"
    return (f"lower --forward-batch (now {getattr(args, 'forward_batch', None) or 'default 4'}), --samples or "
            "--seqlen")


def _run(args, argv) -> int:
    from .errors import InfQuantError, Terminated, is_oom

    try:
        return COMMANDS[args.command](args)
    except InfQuantError as e:
        print(f"inf-quant: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Terminated as e:
        notes = list(getattr(e, "__notes__", ())) or ["nothing was written"]
        print(f"inf-quant: terminated (SIGTERM); {'; '.join(notes)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("inf-quant: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the error contract: nothing escapes as a traceback
        if is_oom(e):
            notes = list(getattr(e, "__notes__", ())) or ["nothing was written"]
            print(f"inf-quant: error: out of memory ({type(e).__name__}): {_oom_advice(args)}; " + "; ".join(notes),
                  file=sys.stderr)
            return 2
        if isinstance(e, OSError) and (advice := environment_advice(e)):
            print(f"inf-quant: error: {'; '.join([advice, *getattr(e, '__notes__', ())])}", file=sys.stderr)
            return 2
        log_file = crash_log(sys.argv[1:] if argv is None else argv, e, getattr(args, "log_dir", None))
        print(f"inf-quant: internal error: {type(e).__name__}: {one_line(e)[:300]} (traceback in {log_file}; "
              "please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
