"""The output side of a quantization run: work directory (resume), assembly of the release, atomic publish.

Nothing under the final directory exists until the run is complete: layers go to `.<name>.partial/`, the
release is assembled in `.<name>.partial/out/` and renamed into place in one step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .. import __version__
from ..core.config import Layout, Method, Order, Recipe, to_dict
from ..core.errors import ConfigError, resumable
from ..core.hashing import cache_root, checkpoint_sha256
from ..core.paths import REPO_ROOT
from ..data.fast_tokenizer import fast_tokenizer_config, is_inflm_tokenizer, write_fast_tokenizer
from ..engine.context import Context, LayerResult
from ..engine.memory import PeakMemory, gib
from ..read.layout import stablelm_config
from ..read.shards import read_header
from .write import (INFLM_AUTO_MAP, INFLM_TOKENIZER_AUTO_MAP, copy_modeling_files, copy_side_files, save_file,
                    save_sharded_lazy, write_json)

log = logging.getLogger(__name__)
STATE = "state.json"


def fingerprint(ctx: Context) -> dict:
    """What the output bytes depend on; a resumed run must match it exactly. The model enters by content (sha256
    of config.json and every shard), so a refreshed checkpoint of the same shapes does not resume into a mix."""
    return {
        "recipe": public_recipe(ctx.recipe),
        "calibration_sha256": ctx.calib_sha256,
        "model_config": ctx.ckpt.config,
        # content, memoised by (path, size, mtime) in the recipe's cache directory (--cache-dir)
        "model_sha256": checkpoint_sha256(ctx.ckpt.path, ctx.ckpt.files, cache_root(ctx.recipe.verify.cache_dir)),
        "device": ctx.device.type,
        "dtype": str(ctx.dtype),
        "inf_quant": __version__,
    }


def public_recipe(recipe: Recipe) -> dict:
    """The resolved recipe as written into outputs: paths reduced to names, so outputs don't embed local paths."""
    d = recipe.fingerprint_dict()
    d["model"]["path"] = Path(recipe.model.path).name
    src = recipe.calibration.source
    d["calibration"]["source"] = src if src.startswith("bundled") else Path(src).name
    return d


@dataclass(frozen=True)
class WorkDir:
    path: Path

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def head_file(self) -> Path:
        return self.path / "lm_head.safetensors"

    def save_head(self, tensors: dict[str, torch.Tensor]) -> None:
        self._save(self.head_file(), {k: v.detach().cpu() for k, v in tensors.items()})

    def save_layer(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        self._save(self.layer_file(i), tensors)

    @staticmethod
    def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Write a finished piece atomically: a resumed run sees it whole or not at all."""
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)


class LayerWriter:
    """Finished layers saved to the work directory on one background thread while the next layer computes (the
    twin of load.LayerReader). `save` copies the tensors to the host in the caller's thread (one copy each, none
    on CPU) and hands them to the thread; at most one layer is in flight, a failed write raises at the next save
    or at close. Use as a context manager: leaving waits for the last write, so a layer that was handed over is
    on disk for --resume even when the run fails."""

    def __init__(self, work: WorkDir):
        self.work = work
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inf-quant-write")
        self._pending: Future | None = None

    def save(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        host = {k: v.detach().cpu() for k, v in tensors.items()}
        self.wait()
        self._pending = self._pool.submit(self.work.save_layer, i, host)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "LayerWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None and self._pending.exception() is not None:
                log.warning("the write of the last finished layer failed too: %s", self._pending.exception())
        finally:
            self._pool.shutdown(wait=True)


def open_work_dir(ctx: Context) -> WorkDir:
    out, rec = ctx.out_dir, ctx.recipe.output  # prepare() already refused an existing out without --force
    work = WorkDir(out.parent / f".{out.name}.partial")
    fp = json.loads(json.dumps(fingerprint(ctx), sort_keys=True))
    state = work.path / STATE
    if work.path.exists() and rec.resume and state.is_file():
        if json.loads(state.read_text())["fingerprint"] != fp:
            raise ConfigError(f"{work.path}: the interrupted run used a different recipe, model or calibration; "
                              "rerun without --resume to start over")
        done = sorted(work.path.glob("layer-*.safetensors"))
        log.info("resuming %s: %d finished layers", work.path, len(done))
        return work
    if work.path.exists():
        log.info("discarding the unfinished run in %s (pass --resume to continue it)", work.path)
        shutil.rmtree(work.path)
    elif rec.resume:
        log.info("--resume: no unfinished run at %s; starting from layer 0", work.path)
    work.path.mkdir(parents=True)
    write_json(state, {"fingerprint": fp})
    return work


def abandon(work: WorkDir, e: BaseException) -> None:
    """A run failed with e: keep its work directory for --resume if it can be resumed, else remove it (the note
    the CLI prints says which). A previous output at the destination is never touched here."""
    if resumable(e):
        e.add_note(f"finished layers kept in {work.path}; rerun with --resume to continue")
    elif work.path.exists():
        shutil.rmtree(work.path, ignore_errors=True)
        e.add_note(f"the unfinished run ({work.path.name}) was removed")


def _block_leftovers(ctx: Context, i: int, saved: set[str]) -> list[str]:
    """Input tensors of layer i that the method did not rewrite (norms for GPTQ), excluding quantized linears."""
    prefix, linears = ctx.lmap.block_prefix(i), ctx.lmap.linears
    names = []
    for n in ctx.ckpt.names(prefix):
        module = n[len(prefix):].rsplit(".", 1)[0]
        if module not in linears and n not in saved:
            names.append(n)
    return names


def _tensor_plan(ctx: Context, work: WorkDir) -> tuple[dict[str, int], dict[str, Path]]:
    """Ordered name -> bytes of the release, and which work file holds each quantized tensor."""
    sizes, source = {}, {}
    lm = ctx.lmap
    for n in ctx.ckpt.names(lm.embed + "."):
        sizes[n] = ctx.ckpt.info(n).nbytes
    def from_work(f: Path) -> set[str]:
        """A work file's tensors into the plan (bytes from its header; its file as their source)."""
        header = read_header(f)
        for n, t in header.items():
            sizes[n], source[n] = t.nbytes, f
        return set(header)

    for i in range(ctx.ckpt.num_layers):
        for n in _block_leftovers(ctx, i, from_work(work.layer_file(i))):
            sizes[n] = ctx.ckpt.info(n).nbytes
    head = work.head_file()
    quantized_head = head.is_file() and from_work(head)  # gptq --lm-head: its GPTQ tensors replace the weight
    for prefix in (lm.final_norm + ".", *(() if quantized_head else (lm.lm_head + ".",))):
        for n in ctx.ckpt.names(prefix):
            sizes[n] = ctx.ckpt.info(n).nbytes
    return dict(sorted(sizes.items(), key=lambda kv: _order_key(kv[0], lm))), source


def _order_key(name: str, lm) -> tuple:
    if name.startswith(lm.embed + "."):
        return (0, 0, name)
    if name.startswith(lm.blocks + "."):
        return (1, int(name[len(lm.blocks) + 1:].split(".", 1)[0]), name)
    return (2, 0 if name.startswith(lm.final_norm + ".") else 1, name)


def _fetch(ctx: Context, source: dict[str, Path]):
    def fetch(keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        from_work = [k for k in keys if k in source]
        for f in sorted({source[k] for k in from_work}):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in from_work if source[k] == f})
        out.update(ctx.ckpt.read([k for k in keys if k not in source]))
        return out

    return fetch


def quantization_config(recipe: Recipe, lmap=None, skip: frozenset = frozenset()) -> dict:
    """The loaders' quantization_config. Skipped linears (left in bf16) are named for each loader:
    GPTQ: `modules_in_block_to_quantize` (transformers/optimum; one list for every layer) and GPTQModel's
    `dynamic` negative matches ("-:regex": {}, also read by vLLM); AWQ: `modules_to_not_convert`."""
    if recipe.method is Method.GPTQ:
        g = recipe.gptq
        q = {"quant_method": "gptq", "bits": g.bits, "group_size": g.group_size, "desc_act": g.order is Order.ACT,
             "sym": g.sym, "damp_percent": g.damp, "true_sequential": True, "static_groups": g.static_groups,
             "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": g.lm_head,
             "meta": {"quantizer": [f"inf-quant:{__version__}"]}}
        if skip:
            rel = sorted({n[len(lmap.blocks) + 1:].split(".", 1)[1] for n in skip})
            q["modules_in_block_to_quantize"] = [[n for n in grp.names if n not in rel] for grp in lmap.groups
                                                 if any(n not in rel for n in grp.names)]
            q["dynamic"] = {f"-:{re.escape(lmap.blocks)}\\.\\d+\\.{re.escape(n)}$": {} for n in rel}
        return q
    a = recipe.awq
    return {"quant_method": "awq", "bits": a.bits, "group_size": a.group_size, "zero_point": a.zero_point,
            "version": "gemm", "modules_to_not_convert": ["lm_head", *sorted(skip)]}


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() if r.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def write_configs(ctx: Context, staging: Path) -> None:
    cfg = {k: v for k, v in ctx.ckpt.config.items() if k not in ("auto_map", "quantization_config")}
    cfg["quantization_config"] = quantization_config(ctx.recipe, ctx.lmap, ctx.skip)
    if cfg["quantization_config"].get("lm_head"):
        cfg["tie_word_embeddings"] = False  # a tied model gets its own (quantized) head; the embedding stays
    copied = copy_side_files(ctx.model_dir, staging)
    cfg = apply_layout(cfg, staging, ctx.recipe.output.serve_as, str(ctx.model_dir))  # + tokenizer.json
    write_json(staging / "config.json", cfg)
    if ctx.recipe.method is Method.GPTQ:
        q = cfg["quantization_config"]
        write_json(staging / "quantize_config.json", {k: q[k] for k in (
            "bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential", "static_groups",
            "checkpoint_format", "quant_method")})
    gen = ctx.model_dir / "generation_config.json"
    if gen.is_file() and "generation_config.json" not in copied:
        shutil.copyfile(gen, staging / "generation_config.json")
    write_json(staging / "inf_quant.json", {"inf_quant_version": __version__, "git_commit": git_commit(),
                                            "recipe": public_recipe(ctx.recipe),
                                            "calibration_sha256": ctx.calib_sha256,
                                            "copied_from_input": copied, "layout": cfg["model_type"]})


def apply_layout(cfg: dict, out_dir: Path, layout: Layout, where: str) -> dict:
    """Write `layout`'s loader files into out_dir (which already holds the tokenizer files); returns config.json.

    Every output whose tokenizer is INFLMTokenizer also gets tokenizer.json, converted from its tokenizer.model.
    """
    if is_inflm_tokenizer(out_dir):
        write_fast_tokenizer(out_dir, out_dir)
    if cfg.get("model_type") != "inflm":  # llama (layout refused by check_layout unless inflm) or INF stablelm
        return cfg
    tcfg_file = out_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text(encoding="utf-8")) if tcfg_file.is_file() else None
    slow = tcfg is not None and tcfg.get("tokenizer_class") == "INFLMTokenizer"
    if layout is Layout.INFLM:
        copy_modeling_files(out_dir)
        if slow:
            write_json(tcfg_file, {**tcfg, "auto_map": dict(INFLM_TOKENIZER_AUTO_MAP)})
        return {**cfg, "auto_map": dict(INFLM_AUTO_MAP)}
    if slow:
        write_json(tcfg_file, fast_tokenizer_config(tcfg))
    return stablelm_config(cfg, where)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory src to dst by rename; an existing dst (--force) is swapped out, then removed."""
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


@dataclass(frozen=True)
class QuantizeReport:
    out_dir: Path
    method: str
    bits: int
    group_size: int
    layers: int
    seconds: float
    peak_rss: int
    peak_vram: int
    expected_peak: int       # the expected peak of RSS (CPU run) or VRAM (CUDA run): memory.py
    base_rss: int            # RSS before the layers (a CPU run's expectation comes on top of it)
    size_bytes: int
    quantized_params: int
    bits_per_weight: float   # bits on disk per quantized weight (codes + scales + zeros + g_idx)
    results: tuple[LayerResult, ...]

    def summary(self) -> dict:
        return {"out_dir": str(self.out_dir), "method": self.method, "bits": self.bits,
                "group_size": self.group_size, "layers": self.layers, "seconds": round(self.seconds, 2),
                "peak_rss_bytes": self.peak_rss, "peak_vram_bytes": self.peak_vram,
                "expected_peak_bytes": self.expected_peak, "base_rss_bytes": self.base_rss, "size_bytes": self.size_bytes,
                "quantized_params": self.quantized_params, "bits_per_weight": round(self.bits_per_weight, 4),
                "resumed_layers": sum(r.resumed for r in self.results),
                "adjustments": [n for r in self.results for n in r.notes]}

    def to_text(self) -> str:
        rows = [("output", str(self.out_dir)), ("method", f"{self.method} w{self.bits} g{self.group_size}"),
                ("layers", str(self.layers)), ("time", f"{self.seconds:.1f} s"), ("peak RAM", gib(self.peak_rss)),
                ("peak VRAM", gib(self.peak_vram) if self.peak_vram else "- (cpu)"),
                ("expected peak", f"{gib(self.expected_peak)} ({'VRAM' if self.peak_vram else 'RAM'})"),
                ("size on disk", f"{self.size_bytes / 1e9:.3f} GB"),
                ("bits per weight", f"{self.bits_per_weight:.3f} (quantized linears)")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def publish(ctx: Context, work: WorkDir, results: list[LayerResult], seconds: float,
            peak: PeakMemory) -> QuantizeReport:
    staging = work.path / "out"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    sizes, source = _tensor_plan(ctx, work)
    meta = {"inf_quant": json.dumps({"version": __version__, "recipe": public_recipe(ctx.recipe)}, sort_keys=True)}
    save_sharded_lazy(sizes, _fetch(ctx, source), staging, int(ctx.recipe.output.shard_gb * 1e9), meta)
    write_configs(ctx, staging)
    qbits = sum(sizes[n] * 8 for n in source if n.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales", "g_idx"))
    qparams = sum(ctx.ckpt.info(f"{ctx.lmap.block_prefix(i)}{n}.weight").shape[0] *
                  ctx.ckpt.info(f"{ctx.lmap.block_prefix(i)}{n}.weight").shape[1]
                  for i in range(ctx.ckpt.num_layers) for n in ctx.lmap.linears
                  if f"{ctx.lmap.block_prefix(i)}{n}" not in ctx.skip)
    if work.head_file().is_file():  # gptq --lm-head
        qparams += int(ctx.config.vocab_size) * int(ctx.config.hidden_size)
    out = ctx.out_dir
    replace_dir(staging, out)
    shutil.rmtree(work.path)
    rss, vram = peak.read()
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return QuantizeReport(out, ctx.recipe.method.value, ctx.recipe.bits, ctx.recipe.group_size,
                          ctx.ckpt.num_layers, seconds, rss, vram, max(r.expected for r in results),
                          peak.base_rss, size, qparams, qbits / max(qparams, 1),
                          tuple(results))


__all__ = ["QuantizeReport", "open_work_dir", "publish", "to_dict"]
