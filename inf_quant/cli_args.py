"""The `inf-quant` argument parser, and the Recipe / VerifyConfig that a command's flags describe.

A gptq/awq flag is a recipe key: its dest is the key it sets (`--calib` sets `calibration.source`) and its default
is None, so only the flags typed on the command line override the recipe (`--recipe FILE`, else config.py's
defaults). README's recipe key table lists every key with its flag, or says that it is recipe-only.
Torch-free: `--help` and argument errors come back before torch is imported.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from . import __version__
from .core.config import AWQConfig, CalibConfig, GPTQConfig, Method, Recipe, RunConfig, parse_device
from .core.errors import ConfigError

EXAMPLES = """examples:
  inf-quant gptq --bits 4                           # the bundled model -> out/inf-tiny-gptq-w4g128
  inf-quant gptq --bits 8 --model /models/INF-34B-Chat --out /releases/inf34b-gptq-w8g128 --device cuda
  inf-quant gptq --bits 4 --order act --damp 0.02 --samples 256 --seqlen 2048 --json
  inf-quant awq --model /models/INF-34B-Chat --out /releases/inf34b-awq-w4g128
  inf-quant gptq --recipe recipes/ci/inf-tiny-gptq-w4g128.yaml --bits 8   # one recipe; typed flags override it
  inf-quant gptq --bits 4 --out out/x --resume       # continue an interrupted run (same bytes as uninterrupted)
  inf-quant gptq --bits 4 --serve-as stablelm        # loads in vLLM/SGLang/transformers without remote code
  inf-quant export --as stablelm out/inf-tiny-gptq-w4g128 out/inf-tiny-gptq-w4g128-stablelm
"""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SECTIONS = frozenset(f.name for f in fields(Recipe))  # a dest whose first part is one of these is a recipe key


def _key(p: argparse.ArgumentParser, flag: str, key: str, **kw) -> None:
    """`flag` sets recipe key `key` ("section.name", or a top-level name) when given; unset, it is None."""
    if kw.get("action") is None and "choices" not in kw:
        kw.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
    p.add_argument(flag, dest=key, default=None, **kw)


def _quant_args(p: argparse.ArgumentParser, m: str, bits: tuple[int, ...]) -> None:
    """The flags gptq and awq share; `m` is the command's own section (gptq or awq) for --bits and --group-size."""
    p.add_argument("--recipe", metavar="FILE", help="run this recipe (YAML, as `release` reads from recipes/); the "
                                                   "flags given here override its keys")
    _key(p, "--model", "model.path", help="bf16 checkpoint directory (default: the bundled models/inf-tiny)")
    _key(p, "--out", "output.dir", help="output directory (default: out/<model>-<method>-w<bits>g<group>)")
    _key(p, "--bits", f"{m}.bits", type=int, choices=bits, help=f"weight bits (default {bits[0]})")
    _key(p, "--group-size", f"{m}.group_size", type=int, help="columns per scale/zero; -1 = per-channel (default 128)")
    _key(p, "--calib", "calibration.source",
         help="bundled (default: plain text), bundled-chat, bundled-mix (both), or a .jsonl ({'text': ...} or "
              "{'messages': [...]} per line) or .txt file")
    _key(p, "--calib-sha256", "calibration.sha256", metavar="HEX",
         help="refuse calibration files whose sha256 (concatenated, in mix order) differs (default: not checked)")
    _key(p, "--samples", "calibration.samples", type=int, help=f"calibration windows (default {CalibConfig.samples})")
    _key(p, "--seqlen", "calibration.seqlen", type=int,
         help="tokens per window (default min(2048, max_position_embeddings))")
    _key(p, "--seed", "calibration.seed", type=int, help=f"calibration sampling seed (default {CalibConfig.seed})")
    _key(p, "--device", "run.device", metavar="{auto,cpu,cuda,cuda:N}",
         help="compute device (default: cuda if available)")
    _key(p, "--dtype", "run.dtype", choices=["auto", "bfloat16", "float32"],
         help="forward compute dtype (default auto: bfloat16 on cuda, float32 on cpu)")
    _key(p, "--forward-batch", "run.forward_batch", type=int,
         help=f"calibration samples per forward chunk (default {RunConfig.forward_batch})")
    _key(p, "--unproven-cuda", "run.unproven_cuda", nargs="+", choices=["bf16-hessian", "graph-columns"],
         metavar="PATH", help="switch on CUDA-only paths no GPU run has proven yet (bf16-hessian, graph-columns); "
                              "recorded in the output's recipe; default: none")
    _key(p, "--skip", "skip", nargs="+", metavar="MODULE",
         help="linears left in bf16: 'mlp.down_proj' (every layer) or, awq only, 'model.layers.0.mlp.down_proj'")
    _key(p, "--shard-gb", "output.shard_gb", type=float, help="max safetensors shard size in GB (default 5)")
    _key(p, "--resume", "output.resume", action="store_true",
         help="continue an interrupted run from its last finished layer")
    _key(p, "--force", "output.force", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _key(p, "--trust-remote-code", "model.trust_remote_code", action="store_true",
         help="run the checkpoint's own Python code")
    _serve_as_arg(p)
    _key(p, "--allow-pickle", "model.allow_pickle", action="store_true",
         help="accept torch pickle (.bin/.pt) weights")
    _cache_dir_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _solve_args(p: argparse.ArgumentParser, note: str = "") -> None:
    """The GPTQ solve's settings (gptq:), read by gptq and by awq's default --solve gptq."""
    _key(p, "--order", "gptq.order", choices=["group-aware", "natural", "act"],
         help=f"{note}column solve order (default group-aware; 'act' = desc_act, not Marlin-friendly unless "
              "--static-groups)")
    _key(p, "--static-groups", "gptq.static_groups", action=argparse.BooleanOptionalAction,
         help=f"{note}with --order act: fix group qparams up front so g_idx stays i // G (default off)")
    _key(p, "--clip-steps", "gptq.clip_steps", type=int,
         help=f"{note}range-shrink candidates per group searched for the least error; 0 = plain min/max "
              f"(default {GPTQConfig.clip_steps})")
    _key(p, "--damp", "gptq.damp", type=float,
         help=f"{note}damping, fraction of mean diag(H) (default {GPTQConfig.damp:g})")
    _key(p, "--block-size", "gptq.block_size", type=int,
         help=f"{note}columns per lazy batch update (default {GPTQConfig.block_size}; the codes do not depend on it "
              "beyond float rounding)")


def _gptq_parser(sub) -> None:
    g = sub.add_parser("gptq", help="GPTQ 4/8-bit quantization", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _quant_args(g, "gptq", (4, 8))
    _key(g, "--sym", "gptq.sym", action=argparse.BooleanOptionalAction, help="symmetric grid (default on)")
    _solve_args(g)
    _key(g, "--clip-max-shrink", "gptq.clip_max_shrink", type=float,
         help=f"the range search's smallest range: (1 - this) x min/max (default {GPTQConfig.clip_max_shrink:g})")
    _key(g, "--clip-norm", "gptq.clip_norm", type=float,
         help=f"with --no-clip-weight: the range search's error sum |w - q|^p (default p = {GPTQConfig.clip_norm:g})")
    _key(g, "--clip-weight", "gptq.clip_weight", action=argparse.BooleanOptionalAction,
         help="the range search's error is sum diag(H) (w - q)^2: each column's squared error times its mean squared "
              "input (default on; --no-clip-weight: sum |w - q|^p, see --clip-norm)")
    _key(g, "--smooth", "gptq.smooth", choices=["auto", "awq", "none"],
         help="awq: AWQ's activation-aware scales (the awq: search keys) folded into the norms/linears before the "
              "GPTQ solve; the output stays plain GPTQ v1. auto (default): awq at 4 bits, none at 8")
    _key(g, "--smooth-loss", "gptq.smooth_loss", choices=["diag", "module"],
         help="what the smoothing scores each candidate scale by: diag (default), each input channel's squared weight "
              "error times its mean squared input; module: AutoAWQ's MSE of the attention/MLP output (~5 x the CPU)")
    _key(g, "--smooth-tokens", "gptq.smooth_tokens", type=int,
         help=f"calibration tokens the smoothing's search reads, in whole samples (default {GPTQConfig.smooth_tokens})")
    _key(g, "--lm-head", "gptq.lm_head", action=argparse.BooleanOptionalAction,
         help="also quantize the lm_head (default off; INF layout only: vLLM with integrations/vllm, transformers "
              "through the copied modeling code)")


def _awq_parser(sub) -> None:
    a = sub.add_parser("awq", help="AWQ 4-bit quantization (gemm format)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _quant_args(a, "awq", (4,))
    _key(a, "--solve", "awq.solve", choices=["rtn", "gptq"],
         help="after the scales: gptq (default) = a GPTQ solve of the scaled weights (its settings: the gptq "
              "flags below), same AWQ gemm format; rtn = AutoAWQ's clip search + round to nearest")
    _solve_args(a, "--solve gptq: ")
    d = AWQConfig
    _key(a, "--grid-points", "awq.grid_points", type=int,
         help=f"scale search: exponents alpha in {{0, 1/n, ..., (n-1)/n}} (default n = {d.grid_points})")
    _key(a, "--scale-forms", "awq.scale_forms", choices=["plain", "duo", "both"],
         help="scale search: x_mean**a (plain, the paper's), AutoAWQ's duo scaling, or both (default plain)")
    _key(a, "--coarse-step", "awq.coarse_step", type=int,
         help=f"scale search: every k-th alpha, then the neighbours of the best; 1 = all (default {d.coarse_step})")
    _key(a, "--search-tokens", "awq.search_tokens", type=int,
         help=f"scale search: calibration tokens used, in whole samples (default {d.search_tokens})")
    _key(a, "--clip-grid", "awq.clip_grid", type=int,
         help=f"--solve rtn: max-abs shrink ratios tried by the clip search (default {d.clip_grid})")
    _key(a, "--clip-max-shrink", "awq.clip_max_shrink", type=float,
         help=f"--solve rtn: the clip search's smallest ratio is 1 - this (default {d.clip_max_shrink:g})")
    _key(a, "--clip-tokens", "awq.clip_tokens", type=int,
         help=f"--solve rtn: calibration tokens sampled for the clip search (default {d.clip_tokens})")


def _verify_parser(sub) -> None:
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
    _cache_dir_arg(v, "cache_dir")
    v.add_argument("--device", metavar="{auto,cpu,cuda,cuda:N}", help="default: cuda if available")
    v.add_argument("--json", action="store_true", help="print verify.json instead of the summary")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    v.add_argument("--trust-remote-code", action="store_true", help="run the checkpoints' own Python code")


def _fit_parser(sub) -> None:
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


def _release_parser(sub) -> None:
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
    _serve_as_arg(r, "serve_as")
    _cache_dir_arg(r, "cache_dir")


def _export_parser(sub) -> None:
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


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the libraries' own log lines and warnings (hidden by default)")
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                   help="our log lines shown from this level up (default $INF_QUANT_LOG, else INFO)")
    p.add_argument("--log-dir", help="where a crash log goes (default $INF_QUANT_LOG_DIR, else "
                                     "~/.cache/inf-quant/logs; the temporary directory if that cannot be written)")


def _serve_as_arg(p: argparse.ArgumentParser, dest: str = "output.serve_as") -> None:
    p.add_argument("--serve-as", dest=dest, choices=["inflm", "stablelm"],
                   help="output layout of an INF model: inflm (default; remote code, as INF ships it) or stablelm "
                        "(transformers/vLLM/SGLang load it natively, fast tokenizer)")


def _cache_dir_arg(p: argparse.ArgumentParser, dest: str = "verify.cache_dir") -> None:
    p.add_argument("--cache-dir", dest=dest, metavar="DIR",
                   help="memo cache: input file hashes, verify baselines (default $XDG_CACHE_HOME/inf-quant, else "
                        "~/.cache/inf-quant)")


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
    for build in (_gptq_parser, _awq_parser, _verify_parser, _fit_parser, _release_parser, _export_parser):
        build(sub)
    for p in sub.choices.values():
        _common_args(p)
    return parser


def overrides_from(args: argparse.Namespace) -> dict:
    """The recipe keys the command line set: {section: {key: value}} (and top-level {key: value}), spelled as in
    a recipe file; --device cuda:N sets run.device and run.gpu."""
    over: dict = {}
    for dest, value in vars(args).items():
        section, _, key = dest.partition(".")
        if value is None or section not in SECTIONS:
            continue
        if key:
            over.setdefault(section, {})[key] = value
        else:
            over[section] = value
    if "device" in over.get("run", {}):
        device, gpu = parse_device(over["run"]["device"])
        over["run"].update(device=device.value, gpu=gpu)
    return over


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """--recipe FILE (else the defaults) for this command, with the flags given on the command line applied."""
    from .core.recipe_file import load_recipe

    method = Method(args.command)
    recipe = load_recipe(args.recipe) if args.recipe else Recipe(method=method)
    if recipe.method is not method:
        raise ConfigError(f"--recipe {args.recipe}: its method is {recipe.method.value}, not {method.value}; run "
                          f"`inf-quant {recipe.method.value} --recipe {args.recipe}`")
    return recipe.with_overrides(overrides_from(args))


def _given(**kw) -> dict:
    """The flags the user actually passed (defaults live in the config dataclasses, not in argparse)."""
    return {k: v for k, v in kw.items() if v is not None}


def verify_config_from_args(args):
    from .core.config import Device, Gates, VerifyConfig

    return VerifyConfig(quantized=args.quantized, baseline=args.baseline or "bundled",
                        trust_remote_code=args.trust_remote_code,
                        gates=Gates(**_given(max_ppl_increase_pct=args.max_ppl_increase_pct, max_kl=args.max_kl,
                                             min_top1_agreement=args.min_top1_agreement)),
                        device=parse_device(args.device)[0] if args.device else Device.AUTO,
                        gpu=parse_device(args.device)[1] if args.device else 0,
                        **_given(eval=args.eval, seqlen=args.seqlen, max_windows=args.max_windows,
                                 vram_gib=args.vram_gib, context=args.context, kv_dtype=args.kv_dtype,
                                 report_dir=args.report, cache_dir=args.cache_dir, top_k=args.top_k,
                                 baseline_gib=args.baseline_gib))
