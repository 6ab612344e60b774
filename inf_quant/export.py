"""Loader-facing layouts of an INF-architecture checkpoint: `inflm` (as INF ships it) and `stablelm` (no remote code).

INF-34B's block is transformers' `StableLmForCausalLM` in one particular configuration: a Llama body whose input,
post-attention and final norms are `nn.LayerNorm` (weight + bias), GQA, a gated SiLU MLP, an untied head and the
same tensor names (q/k/v/o_proj, gate/up/down_proj, input/post_attention_layernorm, model.norm, lm_head). StableLM's
own defaults differ (partial rotary 0.25), so the four settings in STABLELM_SETTINGS are written explicitly. The
tensors are unchanged; only config.json and the tokenizer files differ between the layouts:

    inflm     model_type inflm, auto_map -> the copied modeling files, slow INFLMTokenizer (+ tokenizer.json)
    stablelm  model_type stablelm, no auto_map, no Python files, PreTrainedTokenizerFast over tokenizer.json

`export_stablelm` rewrites a finished inflm directory (bf16, GPTQ or AWQ); `apply_layout` is the part shared with
the quantization writer (`--serve-as`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import Layout
from .errors import CheckpointError, ConfigError
from .fast_tokenizer import FAST_TOKENIZER_FILE, fast_tokenizer_config, is_inflm_tokenizer, write_fast_tokenizer
from .write import (INFLM_AUTO_MAP, INFLM_TOKENIZER_AUTO_MAP, MODELING_FILES, copy_modeling_files,
                    write_json)

log = logging.getLogger(__name__)

# StableLM settings under which it computes INF-34B's function (transformers' defaults: 0.25, False, False, False)
STABLELM_SETTINGS = {"partial_rotary_factor": 1.0, "use_qkv_bias": False, "qk_layernorm": False,
                     "use_parallel_residual": False}
# config.json keys whose meaning is the same in both layouts
CARRIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "layer_norm_eps",
           "use_cache", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
           "torch_dtype", "attention_dropout", "quantization_config")
INF_FAMILY = "inflm"


def rope_theta(cfg: dict, where: str) -> float:
    """INF's rope base from a transformers 5 (`rope_parameters`) or 4.x (`rope_theta`) config; plain rope only."""
    rope = cfg.get("rope_parameters") or {}
    if (cfg.get("rope_scaling") or {}).get("rope_type", "default") != "default" or \
            rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{where}: rope scaling {cfg.get('rope_scaling') or rope} is not exported to stablelm "
                          "(vLLM's and SGLang's StableLM pass only the rope base); serve the inflm layout")
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if not isinstance(theta, (int, float)):
        raise ConfigError(f"{where}: config.json has no rope_theta")
    return float(theta)


def stablelm_config(cfg: dict, where: str) -> dict:
    """config.json of the stablelm layout from an inflm one; refuses settings StableLM cannot express."""
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    problems = []
    if cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        problems.append(f"head_dim={cfg.get('head_dim')} != hidden_size/num_attention_heads (StableLM derives it)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            problems.append(f"{key}=true")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.get('hidden_act')!r}")
    if problems:
        raise ConfigError(f"{where}: cannot be expressed as StableLM: {'; '.join(problems)}")
    theta = rope_theta(cfg, where)
    out = {k: cfg[k] for k in CARRIED if k in cfg}
    out.update(model_type="stablelm", architectures=["StableLmForCausalLM"], hidden_dropout=0.0, rope_theta=theta,
               rope_parameters={"rope_theta": theta, "rope_type": "default", "partial_rotary_factor": 1.0},
               **STABLELM_SETTINGS)
    return out


def is_inf_stablelm(cfg: dict) -> bool:
    """A stablelm config in INF's settings (so it computes the inflm function); StableLM's own defaults are not."""
    if cfg.get("model_type") != "stablelm":
        return False
    factor = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor"))
    return factor == 1.0 and not any(cfg.get(k) for k in ("use_qkv_bias", "qk_layernorm", "use_parallel_residual"))


def architecture(cfg: dict) -> str:
    """The function a config describes: 'inflm' for both INF layouts, else config.json's model_type."""
    return INF_FAMILY if cfg.get("model_type") == "inflm" or is_inf_stablelm(cfg) else cfg.get("model_type", "")


def check_layout(cfg: dict, layout: Layout, where: str) -> None:
    """Before any work: can an output of checkpoint config `cfg` be written in `layout`?"""
    mt = cfg.get("model_type")
    if mt == "stablelm" and not is_inf_stablelm(cfg):
        raise CheckpointError(f"{where}: a stablelm checkpoint is supported only in INF's settings "
                              f"({', '.join(f'{k}={v}' for k, v in STABLELM_SETTINGS.items())})")
    if layout is Layout.STABLELM and architecture(cfg) != INF_FAMILY:
        raise ConfigError(f"{where}: serve_as=stablelm applies to INF-architecture checkpoints; this one is "
                          f"model_type {mt!r}: drop --serve-as stablelm")
    if layout is Layout.INFLM and mt == "stablelm":
        raise ConfigError(f"{where}: the input is already in the stablelm layout and converting back to inflm is not "
                          "implemented; pass --serve-as stablelm (or quantize the inflm original)")
    if layout is Layout.STABLELM and mt == "inflm":
        stablelm_config(cfg, where)  # raises for settings StableLM cannot express


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


@dataclass(frozen=True)
class ExportReport:
    out_dir: Path
    layout: str
    linked: tuple[str, ...]   # files hard-linked from the source (unchanged bytes)
    copied: tuple[str, ...]   # files written: rewritten ones, and copies where hard links are impossible
    skipped: tuple[str, ...]  # source files the export does not carry (modeling code, verify's reports)

    def summary(self) -> dict:
        return {"out_dir": str(self.out_dir), "layout": self.layout, "linked": list(self.linked),
                "copied": list(self.copied), "skipped": list(self.skipped)}

    def to_text(self) -> str:
        return (f"exported {self.out_dir} as {self.layout}: {len(self.linked)} files hard-linked, "
                f"{len(self.copied)} written" + (f"; not carried: {', '.join(self.skipped)}" if self.skipped else ""))


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link src to dst (True); across filesystems copy it instead (False). Other errors propagate."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
    shutil.copyfile(src, dst)
    return False


def export_layout(src: str | Path, out: str | Path, layout: Layout, force: bool = False) -> ExportReport:
    """Write src (an inflm checkpoint: bf16, GPTQ or AWQ) in `layout` into out, atomically.

    Tensors and every other file keep their bytes (hard links where possible); config.json, tokenizer_config.json
    and tokenizer.json are rewritten; inf_quant.json records the layout; verify's reports of src (which describe
    src's files) are not carried. stablelm drops the modeling files; inflm writes inf-quant's current ones, so
    `--as inflm` of INF's original checkpoint is that checkpoint plus the exact fast tokenizer (tokenizer.json)
    that serving engines need.
    """
    from .load import open_checkpoint

    src, out = Path(src), Path(out)
    ckpt = open_checkpoint(src)
    if ckpt.model_type != "inflm":
        raise CheckpointError(f"{src}: export --as {layout.value} takes an inflm checkpoint; this one is model_type "
                              f"{ckpt.model_type!r}")
    check_layout(ckpt.config, layout, str(src))
    if (ckpt.config.get("quantization_config") or {}).get("lm_head"):
        from .preflight import check_quantized_head

        check_quantized_head(ckpt.config, layout.value, f"{src}: its quantized lm_head")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it, or choose another output directory")
    if out.resolve() == src.resolve():
        raise ConfigError(f"{out}: the export must go to a new directory, not onto its source")
    staging = out.parent / f".{out.name}.partial"
    _check_free_space(src, out)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        return _export(src, out, staging, ckpt, layout)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        e.add_note(f"the unfinished export ({staging.name}) was removed; {out} is unchanged")
        raise


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_free_space(src: Path, out: Path) -> None:
    """Before anything is written: the export needs its rewritten files (config, tokenizer files) where it can
    hard-link, every carried file where it must copy (another file system), x 1.1 + 16 MiB."""
    parent = _existing_parent(out.parent.resolve())
    same_fs = parent.stat().st_dev == src.stat().st_dev
    files = [p for p in src.iterdir() if p.is_file()]
    rewritten = {"config.json", "inf_quant.json", "tokenizer_config.json", FAST_TOKENIZER_FILE}
    need = sum(p.stat().st_size for p in files if not same_fs or p.name in rewritten)
    need = int(need * 1.1) + 16 * 2**20
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ConfigError(f"{out}: the export needs about {need / 1e9:.2f} GB free on {parent} "
                          f"({'hard links; rewritten files' if same_fs else 'another file system: every file copied'})"
                          f", only {free / 1e9:.2f} GB is free; free space or choose an output on another disk")


def _export(src: Path, out: Path, staging: Path, ckpt, layout: Layout) -> ExportReport:
    from .output import replace_dir
    from .report import VERIFY_OUTPUTS

    staging.mkdir(parents=True)
    skipped = []
    for p in sorted(q for q in src.iterdir() if q.is_file()):
        if p.name in MODELING_FILES and layout is Layout.INFLM:
            continue  # written afresh by apply_layout
        if p.name in MODELING_FILES or p.name in VERIFY_OUTPUTS:
            skipped.append(p.name)
        elif p.name == "tokenizer_config.json":
            shutil.copyfile(p, staging / p.name)  # rewritten by apply_layout
        elif p.name not in ("config.json", "inf_quant.json"):
            _link_or_copy(p, staging / p.name)  # tokenizer.json, if regenerated, is replaced, never written through
    cfg = apply_layout({k: v for k, v in ckpt.config.items() if k != "auto_map"}, staging, layout, str(src))
    write_json(staging / "config.json", cfg)
    # every output inf-quant writes carries inf_quant.json, the mark `--force` looks for (a bf16 source has none)
    record = json.loads((src / "inf_quant.json").read_text(encoding="utf-8")) if (src / "inf_quant.json").is_file() \
        else {"inf_quant_version": __version__}
    write_json(staging / "inf_quant.json", {**record, "layout": layout.value, "exported_from": src.name})
    names = sorted(p.name for p in staging.iterdir())
    linked = [n for n in names if (src / n).is_file() and os.path.samefile(src / n, staging / n)]
    copied = [n for n in names if n not in linked]
    replace_dir(staging, out)
    log.info("exported %s -> %s (%s): %d hard links, %d files written", src, out, layout.value, len(linked),
             len(copied))
    return ExportReport(out, layout.value, tuple(linked), tuple(copied), tuple(skipped))


def export_stablelm(src: str | Path, out: str | Path, force: bool = False) -> ExportReport:
    """`export_layout` to the stablelm layout (no remote code)."""
    return export_layout(src, out, Layout.STABLELM, force)


__all__ = ["export_layout", "export_stablelm", "apply_layout", "check_layout", "stablelm_config", "architecture",
           "is_inf_stablelm",
           "ExportReport", "STABLELM_SETTINGS"]
