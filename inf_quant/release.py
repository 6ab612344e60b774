"""`release`: regenerate every variant from its recipe, verify it, publish it atomically, and write a manifest
that anyone can check a published release against (`release --check`).

Layout of RELEASE_DIR:
    <name>/              a published variant: the quantized checkpoint + verify.json + report.md + charts
    manifest.json        every published file's sha256 and size, resolved recipes, versions, input hashes, results
    .staging/<name>/     a variant being built (quantized, then verified); renamed to <name>/ only if it passes
    .rejected/<name>/    a variant that failed a gate, kept for inspection, never published
A kill -9 at any point leaves published variants untouched; `--resume` continues where the run stopped and
produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from . import preflight
from .core.config import Layout, Recipe
from .core.errors import ConfigError, resumable
from .core.hashing import cache_root, checkpoint_sha256, file_sha256
from .core.paths import resolve_model_path
from .core.recipe_file import load_recipe
from .evaluate.verify_report import VerifyReport
from .pipeline import quantize
from .read.load import open_checkpoint
from .save.lock import output_lock
from .save.output import git_commit, public_recipe, replace_dir
from .save.write import write_json
from .verify import verify, versions

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ReleaseReport:
    out: Path
    passed: tuple[str, ...]
    failed: dict            # name -> ["gate [domain] value vs threshold", ...]
    manifest: dict

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_text(self) -> str:
        lines = [f"published {len(self.passed)} variant(s) in {self.out}: {', '.join(self.passed) or '-'}"]
        for name, why in self.failed.items():
            lines.append(f"REJECTED {name} (kept in {self.out / '.rejected' / name}): " + "; ".join(why))
        lines.append(f"manifest: {self.out / MANIFEST}")
        return "\n".join(lines)


def load_recipes(recipes_dir: Path, only: tuple[str, ...] = ()) -> list[Recipe]:
    if not recipes_dir.is_dir():
        raise ConfigError(f"{recipes_dir}: no such recipes directory")
    files = sorted([*recipes_dir.glob("*.yaml"), *recipes_dir.glob("*.yml")])
    by_name: dict[str, Path] = {}
    for f in files:
        if f.stem in by_name:
            raise ConfigError(f"{recipes_dir}: {by_name[f.stem].name} and {f.name} both define recipe {f.stem!r}; "
                              "keep one of them")
        by_name[f.stem] = f
    recipes = [load_recipe(p) for p in files]
    if not recipes:
        raise ConfigError(f"{recipes_dir}: no *.yaml or *.yml recipes found")
    names = {r.name for r in recipes}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only {', '.join(unknown)}: no such recipe in {recipes_dir} ({', '.join(sorted(names))})")
    return [r for r in recipes if not only or r.name in only]


def _with_overrides(recipe: Recipe, model: str | None, serve_as: Layout | None, cache_dir: str | None) -> Recipe:
    """The recipe with release's --model, --serve-as and --cache-dir (those given) in place of its own keys."""
    given = {"model": {"path": model}, "output": {"serve_as": serve_as and serve_as.value},
             "verify": {"cache_dir": cache_dir}}
    recipe = recipe.with_overrides({s: {k: v for k, v in kv.items() if v} for s, kv in given.items()})
    resolve_model_path(recipe.model.path)  # raises "no model given" for recipes that leave it to --model
    return recipe


def files_table(d: Path) -> dict:
    return {p.name: {"sha256": file_sha256(p), "size": p.stat().st_size} for p in sorted(d.iterdir()) if p.is_file()}


def _failures(report: VerifyReport) -> list[str]:
    return [f"{g.name} [{g.domain}] {g.value:.4g} vs {g.threshold:g}" for g in report.gates if not g.passed]


def _build(recipe: Recipe, staging: Path, resume: bool, progress) -> VerifyReport:
    """Quantize into staging/<name> (reusing a finished quantization there on resume), then verify it there."""
    target = staging / recipe.name
    marker = target / "inf_quant.json"
    reuse = resume and marker.is_file() and json.loads(marker.read_text())["recipe"] == public_recipe(recipe)
    if not reuse:
        out = dataclasses.replace(recipe.output, dir=str(target), force=True, resume=resume)
        quantize(dataclasses.replace(recipe, output=out), progress=progress)
    vcfg = dataclasses.replace(recipe.verify, quantized=str(target), baseline=recipe.model.path, report_dir="")
    return verify(vcfg)


def _variant_entry(recipe: Recipe, report: VerifyReport, vdir: Path) -> dict:
    analytic = report.vram.analytic
    layout = json.loads((vdir / "config.json").read_text())["model_type"]  # inflm, stablelm (or llama)
    return {"recipe": public_recipe(recipe), "layout": layout, "passed": report.passed,
            "gates_failed": _failures(report),
            "metrics": {d: asdict(m) for d, m in report.metrics.items()},
            "vram": {k: analytic[k] for k in ("budget_bytes", "context", "weights_bytes", "total_bytes", "fits",
                                              "max_context", "verdict")},
            "calibration_sha256": json.loads((vdir / "inf_quant.json").read_text())["calibration_sha256"],
            "files": files_table(vdir)}


def release(recipes_dir: str | Path, out: str | Path, model: str | None = None, only: tuple[str, ...] = (),
            resume: bool = False, force: bool = False, progress=None, serve_as: Layout | None = None,
            cache_dir: str | None = None) -> ReleaseReport:
    """model, serve_as and cache_dir, when given, override every recipe's model.path, output.serve_as and
    verify.cache_dir. With `only`, the other variants of an existing manifest are kept in it (and in --check); on
    resume a published variant is kept only if its recipe is the one it was built from."""
    recipes_dir, out = Path(recipes_dir), Path(out)
    recipes = [_with_overrides(r, model, serve_as, cache_dir) for r in load_recipes(recipes_dir, only)]
    out = preflight.for_release(recipes, str(out))
    existing = [r.name for r in recipes if (out / r.name).exists()]
    if existing and not (resume or force):
        raise ConfigError(f"{out}: variants {', '.join(existing)} already exist; pass --resume to continue a "
                          "release or --force to rebuild them")
    with output_lock(out):
        staging = out / ".staging"
        created = not out.exists()
        staging.mkdir(parents=True, exist_ok=True)
        try:
            return _release(recipes, out, staging, only, resume, force, progress)
        except BaseException as e:
            if not resumable(e):
                shutil.rmtree(staging, ignore_errors=True)
                if created and out.is_dir() and not any(out.iterdir()):
                    out.rmdir()
                e.add_note("the unfinished variant in .staging was removed")
            else:
                e.add_note(f"unfinished work kept in {staging}; rerun with --resume to continue")
            raise


def _built_from(vdir: Path) -> dict | None:
    """The resolved recipe a published variant records in its inf_quant.json (None if unreadable)."""
    try:
        return json.loads((vdir / "inf_quant.json").read_text())["recipe"]
    except (OSError, ValueError, KeyError):
        return None


def _previous_manifest(out: Path) -> dict:
    mf = out / MANIFEST
    if not mf.is_file():
        return {}
    try:
        return json.loads(mf.read_text())
    except ValueError:
        raise ConfigError(f"{mf}: not valid JSON; restore it, or move it away to start the manifest afresh") from None


def _release(recipes, out: Path, staging: Path, only, resume: bool, force: bool, progress) -> ReleaseReport:
    previous = _previous_manifest(out)
    inputs, variants, passed, failed = {}, {}, [], {}
    for r in recipes:
        mdir = resolve_model_path(r.model.path)
        inputs[mdir.name] = checkpoint_sha256(mdir, open_checkpoint(mdir).files, cache_root(r.verify.cache_dir))
        final = out / r.name
        if resume and not force and (final / "verify.json").is_file() and _built_from(final) == public_recipe(r):
            log.info("%s: already published from this recipe, keeping it", r.name)
            report = VerifyReport.read(final / "verify.json")
        else:
            if resume and (final / "verify.json").is_file():
                log.info("%s: published from a different recipe: rebuilding it", r.name)
            log.info("%s: quantize -> verify", r.name)
            report = _build(r, staging, resume, progress)
            if report.passed:
                replace_dir(staging / r.name, final)
            else:
                replace_dir(staging / r.name, out / ".rejected" / r.name)
                final = out / ".rejected" / r.name
        if report.passed:
            passed.append(r.name)
            variants[r.name] = _variant_entry(r, report, final)
        else:
            failed[r.name] = _failures(report)
    if only:  # merge: the variants not rebuilt now stay in the manifest as they were
        built = {r.name for r in recipes}
        variants = {**{k: v for k, v in previous.get("variants", {}).items() if k not in built}, **variants}
        failed = {**{k: v for k, v in previous.get("rejected", {}).items() if k not in built}, **failed}
        inputs = {**previous.get("input_models_sha256", {}), **inputs}
    manifest = {"format": 1, "inf_quant": __version__, "git_commit": git_commit(), "versions": versions(),
                "input_models_sha256": dict(sorted(inputs.items())), "variants": dict(sorted(variants.items())),
                "rejected": dict(sorted(failed.items()))}
    tmp = out / f".{MANIFEST}.tmp"
    write_json(tmp, manifest)
    os.replace(tmp, out / MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)
    return ReleaseReport(out, tuple(passed), failed, manifest)


UNPUBLISHED = ".rejected"   # variants that failed a gate, kept for inspection; listed under 'rejected', not hashed


def _plain_name(name, where: str, mf: Path) -> None:
    """A manifest path must be one plain name inside the release: no separators, no '..', nothing absolute."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") or \
            (where == "variant" and name.startswith(".")):
        raise ConfigError(f"{mf}: not a valid manifest ({where} name {name!r} is not a plain name inside the release, "
                          "so it could reach files outside it); restore it from the release")


def read_manifest(mf: Path) -> dict[str, dict[str, tuple[str, int]]]:
    """variant -> file -> (sha256, size) from a release's manifest.json; any malformed part is a ConfigError naming
    it (a manifest is input: a hand edit, a truncated copy, or a tamper that points outside the release)."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{mf}: not a valid manifest ({what}); restore it from the release")

    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    variants = manifest.get("variants") if isinstance(manifest, dict) else None
    if not isinstance(variants, dict):
        raise bad("no 'variants' object")
    out = {}
    for name, v in variants.items():
        _plain_name(name, "variant", mf)
        files = v.get("files") if isinstance(v, dict) else None
        if not isinstance(files, dict) or not files:
            raise bad(f"variants[{name!r}] has no 'files' object")
        out[name] = {}
        for fname, want in files.items():
            _plain_name(fname, "file", mf)
            where = f"variants[{name!r}].files[{fname!r}]"
            if not isinstance(want, dict):
                raise bad(f"{where} is not an object with 'sha256' and 'size'")
            sha, size = want.get("sha256"), want.get("size")
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise bad(f"{where} has no 'sha256' of 64 hex digits (got {sha!r})")
            if type(size) is not int or size < 0:
                raise bad(f"{where} has no 'size' in bytes (got {size!r})")
            out[name][fname] = (sha, size)
    return out


def check(release_dir: str | Path) -> list[str]:
    """Re-hash a published release against its manifest: a list of problems (empty = intact).

    Complete both ways: every file the manifest lists must be there with its size and sha256, and every file and
    directory under the release must be in the manifest, except manifest.json itself and .rejected/ (variants that
    failed a gate, never published). Symlinks are problems, never followed: a release holds plain files. A
    malformed manifest (not JSON, a missing or mistyped field, a path that is not one plain name inside the
    release) is a ConfigError before anything is read."""
    d = Path(release_dir)
    mf = d / MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{d}: no {MANIFEST}; is this a release directory written by `inf-quant release`?")
    variants = read_manifest(mf)
    problems = []
    for name, files in variants.items():
        vdir = d / name
        if vdir.is_symlink() or not vdir.is_dir():
            problems.append(f"{name}/: {'a symlink, not a directory' if vdir.is_symlink() else 'missing'}")
            continue
        for fname, (sha, size) in files.items():
            p = vdir / fname
            if p.is_symlink():
                problems.append(f"{name}/{fname}: a symlink, not a file")
            elif not p.is_file():
                problems.append(f"{name}/{fname}: missing")
            elif p.stat().st_size != size:
                problems.append(f"{name}/{fname}: sha256 or size differs from the manifest (size {p.stat().st_size}, "
                                f"listed {size})")
            elif file_sha256(p) != sha:
                problems.append(f"{name}/{fname}: sha256 or size differs from the manifest (same size, another sha256)")
        for p in sorted(vdir.iterdir()):
            if p.name not in files:
                kind = "/" if p.is_dir() and not p.is_symlink() else ""
                problems.append(f"{name}/{p.name}{kind}: not in the manifest")
    for p in sorted(d.iterdir()):
        if p.name == MANIFEST or (p.name == UNPUBLISHED and p.is_dir() and not p.is_symlink()):
            continue
        if p.name not in variants:
            kind = "/" if p.is_dir() and not p.is_symlink() else ""
            problems.append(f"{p.name}{kind}: not in the manifest")
    return problems
