"""`inf-quant export`: rewrite a finished inflm directory (bf16, GPTQ or AWQ) in another loader-facing layout.

The layouts and their rules are in layout.py; the files each layout needs are written by output.apply_layout, which
the quantization writer (`--serve-as`) shares. Tensors keep their bytes (hard links where possible).
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
from .core.config import Layout
from .core.errors import CheckpointError, ConfigError
from .data.fast_tokenizer import FAST_TOKENIZER_FILE
from .evaluate.report import VERIFY_OUTPUTS
from .preflight import check_quantized_head
from .read.checkpoint import CheckedCheckpoint
from .read.layout import check_layout
from .read.load import Checkpoint, open_checkpoint
from .save.output import apply_layout, replace_dir
from .save.write import MODELING_FILES, write_json

log = logging.getLogger(__name__)


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


def export_layout(src: str | Path, out: str | Path, layout: Layout, force: bool = False,
                  checked: CheckedCheckpoint | None = None) -> ExportReport:
    """Write src (an inflm checkpoint: bf16, GPTQ or AWQ) in `layout` into out, atomically.

    Tensors and every other file keep their bytes (hard links where possible); config.json, tokenizer_config.json
    and tokenizer.json are rewritten; inf_quant.json records the layout; verify's reports of src (which describe
    src's files) are not carried. stablelm drops the modeling files; inflm writes inf-quant's current ones, so
    `--as inflm` of INF's original checkpoint is that checkpoint plus the exact fast tokenizer (tokenizer.json)
    that serving engines need. checked: pre-flight's check of src (preflight.for_export), not read again.
    """
    src, out = Path(src), Path(out)
    ckpt = open_checkpoint(src, checked=checked)
    if ckpt.model_type != "inflm":
        raise CheckpointError(f"{src}: export --as {layout.value} takes an inflm checkpoint; this one is model_type "
                              f"{ckpt.model_type!r}")
    check_layout(ckpt.config, layout, str(src))
    if (ckpt.config.get("quantization_config") or {}).get("lm_head"):
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


def _export(src: Path, out: Path, staging: Path, ckpt: Checkpoint, layout: Layout) -> ExportReport:
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


__all__ = ["export_layout", "export_stablelm", "ExportReport"]
