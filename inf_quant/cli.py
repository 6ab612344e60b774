"""`inf-quant`: parse flags -> Recipe -> pre-flight -> one library call -> exit code. Nothing else.

Exit codes: 0 success; 1 a verification gate failed; 2 bad input or environment, out of memory, disk full (one
line on stderr: what, where, how to fix); 3 an unexpected error (one line; the traceback goes to a log file whose
path is printed); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM; like Ctrl-C, the lock released and the
work directory kept for --resume). Arguments and pre-flight (preflight.py) are checked before torch or
transformers is imported; library output is kept off the terminal (and in the crash log) unless --verbose.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from .cli_args import LOG_LEVELS, build_parser, recipe_from_args, verify_config_from_args
from .console import crash_log, environment_advice, library_stdout, one_line, sigterm_as_interrupt, terminal


class _Progress:
    """tqdm bar over layers: layer i/N, elapsed, ETA, per-layer error, peak RAM/VRAM."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, r, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        from .engine.memory import gib

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

        from .engine.memory import gib, rss_bytes

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

    from .save.lock import output_lock

    t0 = time.monotonic()
    recipe = recipe_from_args(args)
    plan = preflight.for_quantize(recipe)  # before torch is imported
    with output_lock(plan.out_dir):  # a second run on this output is refused now, not after tokenizing
        from .pipeline import quantize_locked

        with library_stdout(args):
            report = quantize_locked(recipe, plan, _Progress(args.quiet or args.json), t0)
    print(json.dumps(report.summary(), sort_keys=True) if args.json else report.to_text())
    return 0


def _verify(args) -> int:
    from . import preflight

    cfg = verify_config_from_args(args)
    preflight.for_verify(cfg)

    from .verify import verify

    with library_stdout(args):
        report = verify(cfg, progress=_PhaseProgress(args.quiet or args.json))
    print(json.dumps(report.to_json(), sort_keys=True) if args.json else report.to_text())
    return 0 if report.passed else 1


def _fit(args) -> int:
    from .core.errors import ConfigError

    if args.engine == "transformers":
        from .evaluate.fit import fit_checkpoint

        if args.kv_dtype == "auto":
            raise ConfigError("--kv-dtype auto is vLLM's; with --engine transformers pass fp16, bf16 or fp8")
        report = fit_checkpoint(args.model, args.vram_gib, args.context, args.batch, args.kv_dtype or "fp16")
        print(json.dumps(report.to_dict(), sort_keys=True) if args.json else report.to_text())
        return 0 if report.fits else 1
    from .evaluate.fit_vllm import VllmSettings, answer

    kv = "auto" if args.kv_dtype in (None, "fp16", "bf16") else args.kv_dtype  # vLLM's cache: the model dtype or fp8
    settings = VllmSettings(args.gpu_memory_utilization, kv, args.enforce_eager, args.max_num_batched_tokens,
                            args.max_num_seqs, args.tensor_parallel_size)
    fits, text = answer(args.model, args.vram_gib, args.context, settings, args.json)
    print(text)
    return 0 if fits else 1


def _release(args) -> int:
    from .core.config import Layout
    from .core.errors import ConfigError
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
                         serve_as=Layout(args.serve_as) if args.serve_as else None, cache_dir=args.cache_dir)
    print(json.dumps(report.manifest, sort_keys=True) if args.json else report.to_text())
    return 0 if report.ok else 1


def _export(args) -> int:
    from . import preflight

    preflight.for_export(args.src, args.out, args.force)

    from .core.config import Layout
    from .export import export_layout

    report = export_layout(args.src, args.out, Layout(args.layout), args.force)
    print(json.dumps(report.summary(), sort_keys=True) if args.json else report.to_text())
    return 0


COMMANDS = {"gptq": _quantize, "awq": _quantize, "verify": _verify, "fit": _fit,
            "release": _release, "export": _export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or os.environ.get("INF_QUANT_LOG", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        print(f"inf-quant: error: INF_QUANT_LOG={level!r} is not a log level; set it to one of "
              f"{', '.join(LOG_LEVELS)} or pass --log-level", file=sys.stderr)
        return 2
    with terminal(args.verbose, level), sigterm_as_interrupt():
        return _run(args, argv)


def _oom_advice(args) -> str:
    """The flags that size a command's memory."""
    if args.command == "verify":
        return "lower --baseline-gib or --seqlen, or use a machine with more memory"
    return (f"lower --forward-batch (now {getattr(args, 'run.forward_batch', None) or 'default 4'}), --samples or "
            "--seqlen")


def _run(args, argv) -> int:
    from .core.errors import InfQuantError, Terminated, is_oom

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
