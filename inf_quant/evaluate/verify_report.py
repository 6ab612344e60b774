"""What `verify` found, as frozen data (torch-free, below the modules that read it).

verify.json is VerifyReport.to_json(): asdict of the report without its `files`. report.py renders report.md and
the charts from a VerifyReport, release.py reads gates and metrics from it, and VerifyReport.read gives one back
from a verify.json on disk. The VRAM parts stay the JSON of the modules that compute them (fit.FitReport.to_dict,
fit_vllm.VllmFit.to_dict, verify.measure_vram).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class DomainMetrics:
    """Accuracy on one eval domain, or "all" (metrics.summarize)."""

    tokens: int              # predicted positions
    ppl_baseline: float
    ppl_quantized: float
    ppl_increase_pct: float  # 100 (ppl_quantized / ppl_baseline - 1)
    kl_mean: float           # mean KL(bf16 || quantized) in nats (top-k support + tail)
    top1_agreement: float    # fraction of positions where the two argmaxes agree


@dataclass(frozen=True)
class Gate:
    name: str          # max_ppl_increase_pct, max_kl, min_top1_agreement (config.Gates) or fits_vram_gib
    domain: str        # an eval domain, "all", or "context N" (fits_vram_gib)
    threshold: float
    value: float
    passed: bool


@dataclass(frozen=True)
class QuantizedModel:
    path: str                     # the directory's name
    quant_method: str             # quantization_config's: gptq or awq
    bits: int
    group_size: int
    layout: str                   # config.json's model_type
    files_sha256: dict[str, str]  # file name -> sha256, verify's own outputs left out


@dataclass(frozen=True)
class Baseline:
    path: str    # the directory's name
    sha256: str  # the baseline's cache key (baseline.cache_key)


@dataclass(frozen=True)
class EvalSet:
    source: str             # "bundled-eval" or the file's name
    sha256: str             # of the eval file
    seqlen: int             # tokens per window
    tokens: dict[str, int]  # predicted positions per domain


@dataclass(frozen=True)
class Vram:
    analytic: dict                # fit.FitReport.to_dict(): transformers generate(), one-shot prefill
    vllm: dict | None = None      # fit_vllm.VllmFit.to_dict() at verify's card and context
    measured: dict | None = None  # verify.measure_vram on CUDA (with the analytic total at its context), else None
    verify: dict | None = None    # verify's own peak: expected (in verify.json) and measured (in memory only)


@dataclass(frozen=True)
class Backend:
    kernel: str  # the class of the loaded quantized linears ("none" if there are none)
    device: str


@dataclass(frozen=True)
class VerifyReport:
    passed: bool                        # every gate passed
    quantized: QuantizedModel
    baseline: Baseline
    eval: EvalSet
    metrics: dict[str, DomainMetrics]   # "all", then each domain in sorted order
    gates: tuple[Gate, ...]             # in the order verify checked them
    vram: Vram
    versions: dict[str, str | None]     # package -> version (None: not installed)
    backend: Backend
    files: tuple[Path, ...] = ()        # what verify wrote; not part of verify.json

    def to_json(self) -> dict:
        """verify.json's content: asdict of the report, without `files`."""
        d = asdict(self)
        del d["files"]
        return d

    @classmethod
    def from_json(cls, d: dict, files: tuple[Path, ...] = ()) -> VerifyReport:
        """The report whose to_json() is d; TypeError or KeyError where d is not one (VerifyReport.read says
        which file)."""
        return cls(d["passed"], QuantizedModel(**d["quantized"]), Baseline(**d["baseline"]), EvalSet(**d["eval"]),
                   {k: DomainMetrics(**m) for k, m in d["metrics"].items()}, tuple(Gate(**g) for g in d["gates"]),
                   Vram(**d["vram"]), d["versions"], Backend(**d["backend"]), files)

    @classmethod
    def read(cls, path: Path) -> VerifyReport:
        """The report in a verify.json written by `verify`."""
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")), (path,))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}: not a verify.json of this inf-quant version ({type(e).__name__}: {e}); "
                              "rerun `inf-quant verify` on its directory") from None

    def to_text(self) -> str:
        """The summary `inf-quant verify` prints: verdict, a table per domain, failed gates, VRAM, the files."""
        lines = [f"{'PASS' if self.passed else 'FAIL'}: {self.quantized.path}"]
        lines.append(f"{'domain':<6} {'tokens':>7} {'ppl bf16':>9} {'ppl quant':>9} {'delta %':>8} {'KL':>8} "
                     f"{'top-1':>6}")
        for dom, m in self.metrics.items():
            lines.append(f"{dom:<6} {m.tokens:>7} {m.ppl_baseline:>9.3f} {m.ppl_quantized:>9.3f} "
                         f"{signed_pct(m.ppl_increase_pct, 2).removesuffix(' %'):>8} {m.kl_mean:>8.4f} "
                         f"{m.top1_agreement:>6.3f}")
        for g in self.gates:
            if not g.passed:
                lines.append(f"gate failed: {g.name} [{g.domain}] value {g.value:.4g}, threshold {g.threshold:g}")
        lines.append("transformers generate() (one-shot prefill): " + self.vram.analytic["verdict"])
        if self.vram.vllm is not None:
            lines.append(f"{self.vram.vllm['verdict']}: {self.vram.vllm['command']}")
        own = self.vram.verify
        if own and "measured_bytes" in own:
            ph, ex = own["phases"], own["expected_phases_bytes"]
            above = "" if own["what"].startswith("CUDA") else " above the loaded model"
            lines.append(f"verify itself ({own['what']}, {own['windows']} windows of {own['seqlen']} tokens): baseline "
                         f"{gib(ph['baseline']['added_bytes'])} GiB (expected {gib(ex['baseline'])} GiB), scoring "
                         f"{gib(ph['scoring']['added_bytes'])} GiB{above} (expected {gib(ex['scoring'])} GiB); "
                         f"process peak {gib(own['measured_bytes'])} GiB")
        m = self.vram.measured
        if m:
            lines.append(f"measured on {m['device']} at context {m['context']}: peak allocated "
                         f"{gib(m['peak_allocated_bytes'])} GiB, reserved {gib(m['peak_reserved_bytes'])} GiB")
        lines.append("report: " + ", ".join(str(f) for f in self.files))
        return "\n".join(lines)


def signed_pct(v: float, digits: int) -> str:
    """'+1.2 %' / '-0.5 %'; a value that rounds to zero is '+0.0 %', never '-0.0 %'."""
    text = f"{v:+.{digits}f}"
    return f"{0.0 if float(text) == 0 else v:+.{digits}f} %"


def gib(n: int | float) -> str:
    """Bytes as GiB with two decimals, without the unit."""
    return f"{n / GIB:.2f}"


__all__ = ["VerifyReport", "DomainMetrics", "Gate", "QuantizedModel", "Baseline", "EvalSet", "Vram", "Backend",
           "signed_pct", "gib"]
