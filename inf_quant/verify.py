"""`verify`: is a quantized checkpoint as good as its bf16 baseline, and does it fit the card?

Accuracy: the eval set, split by domain (en / zh / code / math), is run through the bf16 baseline layer-streamed
(cached, see baseline.py) and through the quantized model **as users load it** (`AutoModelForCausalLM.
from_pretrained` and whichever backend transformers picks). Perplexity, KL(bf16 || quantized) and top-1
agreement are gated per domain and overall. VRAM: the analytic `fit` model, plus, on CUDA, a measured prefill
+ decode. Writes verify.json and report.md (+ PNG charts).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from dataclasses import replace
from pathlib import Path

import torch

from . import __version__
from .core.config import Gates, VerifyConfig
from .core.errors import CheckpointError, ConfigError
from .core.hashing import file_sha256
from .core.paths import resolve_model_path
from .data.calibrate import eval_windows, read_records, resolve_text_file, token_stream
from .data.tokenizer import load_tokenizer
from .engine.device import resolve_device
from .engine.memory import LOGIT_CHUNK_BYTES, MEMORY_MARGIN, PeakMemory, available_bytes, expected_verify_peak, gib
from .evaluate.baseline import baseline_stats
from .evaluate.fit import checkpoint_bytes, fit_checkpoint
from .evaluate.fit_vllm import VllmSettings, fit_checkpoint_vllm
from .evaluate.metrics import kl_topk, summarize, top1_agreement
from .evaluate.report import VERIFY_OUTPUTS, write_report
from .evaluate.verify_report import (Backend, Baseline, DomainMetrics, EvalSet, Gate, QuantizedModel, VerifyReport,
                                     Vram)
from .preflight import VerifyPlan
from .read.layout import architecture
from .read.load import open_checkpoint
from .save.write import write_json

log = logging.getLogger(__name__)
ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads")


def check_pair(quant_cfg: dict, base_cfg: dict, qdir: Path, bdir: Path) -> None:
    if "quantization_config" not in quant_cfg:
        raise CheckpointError(f"{qdir}: config.json has no quantization_config; this is not a quantized checkpoint")
    if "quantization_config" in base_cfg:
        raise CheckpointError(f"{bdir}: the baseline is itself quantized; pass the bf16 source checkpoint")
    qa, ba = architecture(quant_cfg), architecture(base_cfg)  # inflm and its stablelm layout compute the same
    if qa != ba:
        raise CheckpointError(f"{qdir} and baseline {bdir} differ in architecture (model_type "
                              f"{quant_cfg.get('model_type')} vs {base_cfg.get('model_type')}); "
                              "verify a checkpoint against the model it was quantized from")
    for k in ARCH_KEYS:
        if quant_cfg.get(k) != base_cfg.get(k):
            raise CheckpointError(f"{qdir} and baseline {bdir} differ in {k} ({quant_cfg.get(k)} vs {base_cfg.get(k)}); "
                                  "verify a checkpoint against the model it was quantized from")


def domain_windows(tokenizer, records: list[dict], seqlen: int, max_windows: int) -> tuple[torch.Tensor, list[str]]:
    """Eval windows [S, T] and the domain of each: every domain's texts are joined (EOS between texts) and cut
    into T-token windows, so no window mixes domains; `max_windows` keeps an evenly spaced subset."""
    by_dom: dict[str, list[str]] = {}
    for r in records:
        by_dom.setdefault(r.get("lang", "all"), []).append(r["text"])
    rows, doms = [], []
    for dom in sorted(by_dom):
        w = eval_windows(tokenizer, by_dom[dom], seqlen)
        if len(w) == 0:
            raise ConfigError(f"eval domain {dom!r} has {len(token_stream(tokenizer, by_dom[dom]))} tokens, fewer "
                              f"than --seqlen {seqlen}; lower --seqlen or add text")
        rows.append(w)
        doms += [dom] * len(w)
    total = sum(len(r) for r in rows)
    if max_windows and total > max_windows:  # each domain keeps its share (at least one window), evenly spaced
        rows = [r[torch.linspace(0, len(r) - 1, max(1, round(max_windows * len(r) / total))).round().long().unique()]
                for r in rows]
        doms = [d for d, r in zip(sorted(by_dom), rows) for _ in range(len(r))]
    return torch.cat(rows), doms


def quantized_stats(model, windows: torch.Tensor, base, chunk_bytes: int = LOGIT_CHUNK_BYTES, progress=None):
    """Target log-prob, KL and top-1 agreement of the loaded quantized model, each [S, T-1] fp32 on the host.

    One window at a time (batch 1), no KV cache: the decoder's final hidden states [T, D], then lm_head and
    log_softmax over chunks of C = chunk_bytes / (4 V) positions, so only per-position results leave a chunk.
    Device memory beyond the weights: one window's activations + about 3 x [C, V] fp32 (logits, log-probs, exp).
    progress("scoring", done, total), if given, after each window.
    """
    dev = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    step = max(1, chunk_bytes // (4 * int(model.config.vocab_size)))
    # the results are allocated once, up front: small tensors kept per chunk would pin glibc's heap above each
    # chunk's freed logits, and the host RSS would grow with the eval set (measured: +4 MB a window on CPU)
    n, t = windows.shape
    tgt, kl, agree = (torch.empty(n, t - 1, dtype=torch.float32) for _ in range(3))
    with torch.no_grad():
        for s in range(n):
            ids = windows[s: s + 1].to(dev)
            h = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
            for c in range(0, len(h), step):
                logp = torch.log_softmax(head(h[c: c + step]).float(), -1)
                top_lp, top_id = base.topk_logp[s, c: c + step].to(dev), base.topk_idx[s, c: c + step].to(dev)
                rows = slice(c, c + len(logp))
                tgt[s, rows] = logp.gather(-1, ids[0, 1 + c: 1 + c + step, None])[:, 0]
                kl[s, rows] = kl_topk(top_lp, top_id, logp)
                agree[s, rows] = top1_agreement(top_id, logp)
                del logp
            if progress:
                progress("scoring", s + 1, n)
    return tgt, kl, agree


def gate_results(metrics: dict[str, DomainMetrics], gates: Gates) -> list[Gate]:
    out = []
    for dom, m in metrics.items():
        if dom != "all" and m.tokens < gates.min_domain_tokens:
            continue
        for name, key, ok in (("max_ppl_increase_pct", "ppl_increase_pct", lambda v, t: v <= t),
                              ("max_kl", "kl_mean", lambda v, t: v <= t),
                              ("min_top1_agreement", "top1_agreement", lambda v, t: v >= t)):
            t, v = getattr(gates, name), getattr(m, key)
            out.append(Gate(name, dom, t, v, bool(ok(v, t))))
    return out


def versions() -> dict:
    def v(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"torch": torch.__version__, "transformers": v("transformers"), "gptqmodel": v("gptqmodel"),
            "optimum": v("optimum"), "inf_quant": __version__, "python": platform.python_version()}


def load_quantized(path: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """The quantized model as a user loads it; bf16 on CUDA, fp32 on CPU (where bf16 matmuls are emulated)."""
    from transformers import AutoModelForCausalLM  # inf_quant's __init__ has registered inflm with it

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=str(device),
                                                    trust_remote_code=trust_remote_code).eval()
    except ImportError as e:
        raise ConfigError(f"transformers cannot load {path}: {e}; install the loading stack: "
                          "pip install -e '.[load]' (optimum, gptqmodel, accelerate)") from e


def measure_vram(model, vocab: int, context: int, device: torch.device) -> dict | None:
    """Peak CUDA memory of a prefill at `context` tokens + 8 decoded tokens (None without CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.cuda.synchronize(device)
    used = None
    try:
        import pynvml  # optional: the process' whole footprint, CUDA context included

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    except Exception:  # noqa: BLE001 - NVML is optional; torch's numbers are always reported
        used = None
    return {"device": torch.cuda.get_device_name(device), "context": context,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device), "process_used_bytes": used}


def verify(cfg: VerifyConfig, progress=None, plan: VerifyPlan | None = None) -> VerifyReport:
    """progress(phase, done, total), if given: phase "baseline" (layers x passes) then "scoring" (windows).
    plan: pre-flight's (preflight.for_verify), whose checked checkpoints are not read again; None checks them here."""
    qdir = Path(cfg.quantized)
    bdir = resolve_model_path(cfg.baseline)
    qckpt = open_checkpoint(qdir, checked=plan.quantized if plan else None)
    bckpt = open_checkpoint(bdir, checked=plan.baseline if plan else None)
    check_pair(qckpt.config, bckpt.config, qdir, bdir)
    device, dtype = resolve_device(cfg.device, gpu=cfg.gpu)
    eval_file = resolve_text_file(cfg.eval)
    max_pos = int(bckpt.config.get("max_position_embeddings", cfg.seqlen))
    windows, doms = domain_windows(load_tokenizer(bdir, cfg.trust_remote_code), read_records(eval_file),
                                   min(cfg.seqlen, max_pos), cfg.max_windows)
    refuse_if_too_big(bckpt, qckpt, windows, cfg, device, dtype)
    mem = PeakMemory(device)
    mem.reset()
    start_rss = mem.base_rss
    base = baseline_stats(bckpt, windows, cfg.top_k, device, dtype, cfg.cache_dir,
                          trust_remote_code=cfg.trust_remote_code, budget_gib=cfg.baseline_gib, progress=progress)
    phases = {"baseline": _phase_peak(mem)}
    model = load_quantized(qdir, device, dtype, cfg.trust_remote_code)
    mem.reset()                   # the scoring phase, on top of the loaded model
    tgt, kl, agree = quantized_stats(model, windows, base, progress=progress)
    phases["scoring"] = _phase_peak(mem)
    own = _own_peak(mem, bckpt, qckpt, windows, cfg, dtype, phases, start_rss)
    metrics = {"all": summarize(base.target_logp, tgt, kl, agree)}
    for dom in sorted(set(doms)):
        idx = torch.tensor([i for i, d in enumerate(doms) if d == dom])
        metrics[dom] = summarize(base.target_logp[idx], tgt[idx], kl[idx], agree[idx])
    gates = gate_results(metrics, cfg.gates)
    fit = fit_checkpoint(qdir, cfg.vram_gib, cfg.context or None, kv_dtype=cfg.kv_dtype, checked=qckpt)
    if cfg.gates.require_fit:
        gates.append(Gate("fits_vram_gib", f"context {fit.context}", cfg.vram_gib, fit.total_bytes / 2**30,
                          bool(fit.fits)))
    measure_ctx = cfg.measure_context or min(fit.context, 4096)
    report = VerifyReport(
        passed=all(g.passed for g in gates),
        quantized=QuantizedModel(qdir.name, **_quant_summary(qckpt.config), files_sha256=_files_sha(qdir)),
        baseline=Baseline(bdir.name, base.key),
        eval=EvalSet(cfg.eval if cfg.eval.startswith("bundled") else eval_file.name, file_sha256(eval_file),
                     int(windows.shape[1]), {d: metrics[d].tokens for d in metrics if d != "all"}),
        metrics=metrics, gates=tuple(gates),
        vram=Vram(fit.to_dict(), _vllm_fit(qckpt, cfg), _measured(model, qdir, qckpt, cfg, measure_ctx, device), own),
        versions=versions(), backend=Backend(_kernel(model), str(device)))
    out = Path(cfg.report_dir) if cfg.report_dir else qdir
    out.mkdir(parents=True, exist_ok=True)
    # verify's own measured peaks change run to run: printed (summary, --json), kept out of the deterministic file
    stable = {k: v for k, v in own.items() if k in ("what", "expected_added_bytes", "expected_terms", "expected_phases_bytes",
                                                        "windows", "seqlen")}
    stored = replace(report, vram=replace(report.vram, verify=stable))
    write_json(out / "verify.json", stored.to_json())
    return replace(report, files=(out / "verify.json", *write_report(stored, out)))


def _measured(model, qdir: Path, qckpt, cfg: VerifyConfig, context: int, device: torch.device) -> dict | None:
    m = measure_vram(model, qckpt.config["vocab_size"], context, device)
    if m is not None:  # the analytic model at the same context, for a like-for-like comparison
        m["analytic_total_bytes"] = fit_checkpoint(qdir, cfg.vram_gib, context, kv_dtype=cfg.kv_dtype,
                                                   checked=qckpt).total_bytes
    return m


def _phase_peak(mem: PeakMemory) -> dict:
    """A phase's peak: CUDA allocated (weights included), or the RSS high-water mark and its rise over the RSS
    at the phase's start."""
    rss, vram = mem.read()
    return {"peak_bytes": vram, "added_bytes": vram} if mem.cuda else {"peak_bytes": rss,
                                                                        "added_bytes": rss - mem.base_rss}


def _expected(bckpt, qckpt, windows: torch.Tensor, cfg: VerifyConfig, dtype, on_host: bool):
    """(the quantized weights' bytes, memory.expected_verify_peak for this run)."""
    weights = checkpoint_bytes(qckpt.path, qckpt)[1]
    return weights, expected_verify_peak(bckpt.layer_map, bckpt.config, weights, len(windows), windows.shape[1], 4,
                                         dtype.itemsize, True, cfg.baseline_gib, on_host=on_host)


def refuse_if_too_big(bckpt, qckpt, windows: torch.Tensor, cfg: VerifyConfig, device: torch.device,
                      dtype) -> None:
    """Before the baseline: a verify whose expected peak exceeds the memory available on its device by more than
    MEMORY_MARGIN is a ConfigError naming the flags that size it."""
    avail, where = available_bytes(device)
    exp = _expected(bckpt, qckpt, windows, cfg, dtype, on_host=device.type != "cuda")[1]
    if avail is None or exp.total <= avail * (1 + MEMORY_MARGIN):
        return
    raise ConfigError(f"not enough memory: verify of {qckpt.path} ({len(windows)} windows of --seqlen {windows.shape[1]}, "
                      f"--baseline-gib {cfg.baseline_gib:g}) has an expected peak of {gib(exp.total)} on "
                      f"{device.type} ({exp.describe()}), but {where} has {gib(avail)} available; lower "
                      "--baseline-gib or --seqlen, or run on a machine with more memory")


def _own_peak(mem: PeakMemory, bckpt, qckpt, windows: torch.Tensor, cfg: VerifyConfig, dtype,
              phases: dict, start_rss: int) -> dict:
    """verify's own peak: measured per phase (the layer-streamed baseline; the quantized model's scoring, on top
    of the loaded model) and expected (memory.expected_verify_peak). On CUDA torch's peak allocation; on CPU the
    process' RSS high-water mark, the expectation on top of the RSS held when verify started scoring."""
    weights, exp = _expected(bckpt, qckpt, windows, cfg, dtype, on_host=not mem.cuda)
    # per phase, like for like with phases[...]["added_bytes"]: on CPU the scoring is measured above the loaded model
    per_phase = {"baseline": exp.terms["baseline pass"],
                 "scoring": exp.terms["quantized model"] - (0 if mem.cuda else weights)}
    return {"what": "CUDA allocated" if mem.cuda else "host RSS",
            "measured_bytes": max(p["peak_bytes"] for p in phases.values()),
            "expected_bytes": exp.total + (0 if mem.cuda else start_rss), "expected_added_bytes": exp.total,
            "expected_terms": exp.terms, "expected_phases_bytes": per_phase,
            "phases": phases, "hwm_reset": mem.cuda or mem.hwm_reset,
            "windows": len(windows), "seqlen": int(windows.shape[1])}


def _vllm_fit(qckpt, cfg: VerifyConfig) -> dict:
    """`fit --engine vllm`'s answer at verify's card and context; the command names the directory, not its path."""
    settings = VllmSettings(kv_dtype="fp8" if cfg.kv_dtype == "fp8" else "auto")
    return fit_checkpoint_vllm(qckpt.path, cfg.vram_gib, cfg.context or None, settings, shown_as=qckpt.path.name,
                               checked=qckpt).to_dict()


def _quant_summary(config: dict) -> dict:
    q = config["quantization_config"]
    return {"quant_method": q.get("quant_method"), "bits": q.get("bits"), "group_size": q.get("group_size"),
            "layout": config.get("model_type")}


def _files_sha(path: Path) -> dict:
    return {p.name: file_sha256(p) for p in sorted(path.iterdir()) if p.is_file() and p.name not in VERIFY_OUTPUTS}


def _kernel(model) -> str:
    for m in model.modules():
        if hasattr(m, "qweight"):
            return type(m).__name__
    return "none"


__all__ = ["verify", "VerifyReport", "domain_windows", "gate_results", "check_pair"]
