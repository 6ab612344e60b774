"""The release report of `verify`: its VerifyReport (verify_report.py) → report.md, ppl_by_domain.png and vram.png.

Everything written here is a pure function of the report: no timestamps, no local state, and PNGs rendered with
a fixed size, dpi and font and without the "Software" tag, so the same report gives byte-identical files in any
process. matplotlib is imported only inside the render functions, and only its object API (Figure +
FigureCanvasAgg) is used, so importing this module selects no backend and touches no global state.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.errors import InfQuantError
from .verify_report import GIB, Gate, VerifyReport, Vram, gib as _gib, signed_pct

log = logging.getLogger(__name__)

DOMAINS = ("all", "en", "zh", "code", "math")   # report order; other domains follow, sorted
PPL_PNG = "ppl_by_domain.png"
VRAM_PNG = "vram.png"
VERIFY_OUTPUTS = ("verify.json", "report.md", PPL_PNG, VRAM_PNG)  # what `verify` writes into a directory
DPI = 100
BAR_HEIGHT = 0.55
FONT = "DejaVu Sans"                             # bundled with matplotlib, so the same glyphs everywhere
SHORT_SHA = 12                                   # hex digits shown in report.md; verify.json has all 64
# Gate name → (metric it tests, comparison shown, value format).
GATE_METRIC = {
    "max_ppl_increase_pct": ("ppl_increase_pct", "≤", lambda v: signed_pct(v, 2)),
    "max_kl": ("kl_mean", "≤", lambda v: f"{v:.4f}"),
    "min_top1_agreement": ("top1_agreement", "≥", lambda v: f"{100 * v:.2f} %"),
    "fits_vram_gib": (None, "≤", lambda v: f"{v:.2f} GiB"),
}
# Analytic VRAM parts: (key in vram.analytic, label, colour). Colours are fixed so the charts never drift.
VRAM_PARTS = (("weights_bytes", "weights", "#4C72B0"), ("kv_bytes", "KV cache", "#DD8452"),
              ("activation_bytes", "activations", "#55A868"), ("logits_bytes", "logits", "#8172B3"),
              ("overhead_bytes", "overhead", "#937860"))


def write_report(report: VerifyReport, out_dir: Path) -> list[Path]:
    """Write report.md, ppl_by_domain.png and vram.png for one `verify` result into out_dir.
    Returns the written paths in the order [report.md, ppl_by_domain.png, vram.png].
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, ppl, vram = out_dir / "report.md", out_dir / PPL_PNG, out_dir / VRAM_PNG
    ppl.write_bytes(render_ppl_png(report))
    vram.write_bytes(render_vram_png(report))
    md.write_bytes(render_markdown(report).encode("utf-8"))
    log.info("wrote %s, %s and %s", md, ppl, vram)
    return [md, ppl, vram]


# ---------------------------------------------------------------------------------------------- markdown


def render_markdown(report: VerifyReport) -> str:
    """report.md as one string, deterministic for a given report."""
    sections = [_md_header(report), _md_gates(report.gates), _md_accuracy(report),
                _md_vram(report.vram), _md_eval(report), _md_inputs(report), _md_environment(report)]
    return "\n\n".join(sections) + "\n"


def _md_header(report: VerifyReport) -> str:
    q, gates = report.quantized, report.gates
    verdict = "✅ PASS" if report.passed else "❌ FAIL"
    group = "per-channel" if q.group_size == -1 else f"group size {q.group_size}"
    failed = sum(not g.passed for g in gates)
    summary = (f"All {len(gates)} gates passed." if failed == 0
               else f"**{failed} of {len(gates)} gates failed** (listed first below).")
    return "\n".join([
        f"# {model_name(report)}: {verdict}", "",
        f"{q.quant_method.upper()} {q.bits}-bit, {group}, compared with the bf16 baseline "
        f"**{_cell(Path(report.baseline.path).name)}** on `{_cell(report.eval.source)}` "
        f"(seqlen {report.eval.seqlen:,}).", "",
        summary])


def model_name(report: VerifyReport) -> str:
    """The quantized checkpoint's directory name, as the report calls it."""
    return Path(report.quantized.path).name


def _md_gates(gates: tuple[Gate, ...]) -> str:
    """Failing gates first; otherwise the order `verify` checked them in."""
    rows = [_row("Gate", "Domain", "Threshold", "Value", "Result"), _row(*["---"] * 5)]
    for g in sorted(gates, key=lambda g: g.passed):
        _, op, fmt = GATE_METRIC.get(g.name, (None, "", lambda v: f"{v:.4g}"))
        threshold = f"{op} {fmt(g.threshold).lstrip('+')}".strip()
        rows.append(_row(f"`{g.name}`", g.domain, threshold, fmt(g.value), "✅ pass" if g.passed else "❌ FAIL"))
    if not gates:
        rows.append(_row("(no gates)", "", "", "", ""))
    return "## Gates\n\n" + "\n".join(rows)


def _md_accuracy(report: VerifyReport) -> str:
    """One row per domain; a value whose gate failed carries ❌."""
    failed = {(GATE_METRIC[g.name][0], g.domain) for g in report.gates if not g.passed and g.name in GATE_METRIC}

    def mark(metric: str, domain: str, text: str) -> str:
        return f"{text} ❌" if (metric, domain) in failed else text

    rows = [_row("Domain", "Tokens", "bf16 PPL", "Quantized PPL", "Δ PPL", "KL (mean, nats)", "Top-1 agreement"),
            _row("---", *["---:"] * 6)]
    for d in ordered_domains(report.metrics):
        m = report.metrics[d]
        rows.append(_row(d, f"{m.tokens:,}", f"{m.ppl_baseline:.3f}", f"{m.ppl_quantized:.3f}",
                         mark("ppl_increase_pct", d, signed_pct(m.ppl_increase_pct, 2)),
                         mark("kl_mean", d, f"{m.kl_mean:.4f}"),
                         mark("top1_agreement", d, f"{100 * m.top1_agreement:.2f} %")))
    image = f"![Perplexity by domain, bf16 vs {_cell(model_name(report))}]({PPL_PNG})"
    return "## Accuracy\n\n" + "\n".join(rows) + "\n\n" + image


def ordered_domains(metrics: dict) -> list[str]:
    """Known domains in DOMAINS order, then any others sorted, so output never depends on dict order."""
    return [d for d in DOMAINS if d in metrics] + sorted(d for d in metrics if d not in DOMAINS)


def _md_vram(vram: Vram) -> str:
    a = vram.analytic
    head = (f"## VRAM\n\nAnalytic estimate at context {a['context']:,}, batch {a['batch']}, "
            f"KV cache in {a['kv_dtype']} ({a['kv_bytes_per_token'] / 2**10:.1f} KiB/token):")
    rows = [_row("Component", "GiB", "Share of total"), _row("---", "---:", "---:")]
    for key, label, _ in VRAM_PARTS:
        if key == "kv_bytes":
            label = f"KV cache at context {a['context']:,}"
        rows.append(_row(label, _gib(a[key]), f"{100 * a[key] / a['total_bytes']:.1f} %"))
    rows += [_row("**total**", f"**{_gib(a['total_bytes'])}**", ""),
             _row("budget", _gib(a["budget_bytes"]), ""),
             _row("headroom", _gib(a["budget_bytes"] - a["total_bytes"]), "")]
    largest = (f"{a['max_context']:,} tokens" if a["max_context"] > 0
               else "none (not even one token fits)")
    lines = [head, "", *rows, "",
             f"**Verdict (transformers generate(), one-shot prefill):** {'✅' if a['fits'] else '❌'} {a['verdict']}",
             "",
             f"**Largest context that fits in {_gib(a['budget_bytes'])} GiB:** {largest}.", "",
             *([f"**vLLM 0.32** (`inf-quant fit`'s default engine): {v['verdict']} — `{v['command']}`", ""]
               if (v := vram.vllm) else []),
             _md_measured(a, vram.measured), "",
             f"![VRAM: analytic breakdown vs the {_gib(a['budget_bytes'])} GiB budget]({VRAM_PNG})"]
    return "\n".join(lines)


def _md_measured(a: dict, m: dict | None) -> str:
    """Measured peaks next to the analytic total, with their difference in %."""
    if m is None:
        return "**Measured:** not measured in this run; the numbers above are the analytic estimate only."
    ref, ref_ctx = a["total_bytes"], a["context"]
    if m.get("analytic_total_bytes") is not None:  # verify's estimate at the measured context: like for like
        ref, ref_ctx = m["analytic_total_bytes"], m["context"]
    rows = [_row("", "GiB", "vs analytic total"), _row("---", "---:", "---:"),
            _row(f"analytic total (context {ref_ctx:,})", _gib(ref), "")]
    for key, label in (("peak_allocated_bytes", "peak allocated (torch)"),
                       ("peak_reserved_bytes", "peak reserved (torch)"),
                       ("process_used_bytes", "process used (driver)")):
        if m.get(key) is not None:
            rows.append(_row(label, _gib(m[key]), signed_pct(diff_pct(m[key], ref), 1)))
    note = ""
    if m["context"] != ref_ctx:
        note = (f"\n\nThe measurement ran at context {m['context']:,}, the estimate at {ref_ctx:,}: "
                "the difference includes the KV cache and activations of the context gap.")
    return f"**Measured** on {_cell(m['device'])} at context {m['context']:,}:\n\n" + "\n".join(rows) + note


def diff_pct(measured: float, analytic: float) -> float:
    """(measured - analytic) / analytic in %: positive when the estimate is too low."""
    return 100.0 * (measured - analytic) / analytic


def _md_eval(report: VerifyReport) -> str:
    ev = report.eval
    tokens = ", ".join(f"{d} {ev.tokens[d]:,}" for d in ordered_domains(ev.tokens))
    return (f"## Evaluation data\n\n`{_cell(ev.source)}`, windows of {ev.seqlen:,} tokens; "
            f"tokens per domain: {tokens or 'none'}.")


def _md_inputs(report: VerifyReport) -> str:
    q = report.quantized
    rows = [_row("Input", "Path / file", "sha256"), _row("---", "---", "---"),
            _row("bf16 baseline", f"`{_cell(report.baseline.path)}`", _short(report.baseline.sha256)),
            _row("eval data", f"`{_cell(report.eval.source)}`", _short(report.eval.sha256)),
            _row("quantized", f"`{_cell(q.path)}`", "")]
    rows += [_row("", f"`{_cell(name)}`", _short(q.files_sha256[name])) for name in sorted(q.files_sha256)]
    return ("## Inputs\n\nHashes are shortened to their first "
            f"{SHORT_SHA} hex digits; verify.json has them in full.\n\n" + "\n".join(rows))


def _md_environment(report: VerifyReport) -> str:
    v, b = report.versions, report.backend
    known = ("inf_quant", "python", "torch", "transformers", "gptqmodel", "optimum")
    names = [n for n in known if n in v] + sorted(n for n in v if n not in known)
    rows = [_row("Package", "Version"), _row("---", "---")]
    rows += [_row(n, _cell(v[n]) if v[n] is not None else "not installed") for n in names]
    return (f"## Environment\n\nBackend: kernel `{_cell(b.kernel)}` on `{_cell(b.device)}`.\n\n"
            + "\n".join(rows))


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(sha: str) -> str:
    return f"`{sha[:SHORT_SHA]}…`" if len(sha) > SHORT_SHA else f"`{sha}`"


# ------------------------------------------------------------------------------------------------ charts


def _new_figure(width_in: float, height_in: float):
    """An Agg-backed Figure, detached from pyplot and its global figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(draw, report: VerifyReport, size: tuple[float, float]) -> bytes:
    """Render draw(fig, report) to PNG bytes under matplotlib's default style and a fixed font.

    The style context ignores any user matplotlibrc; metadata={"Software": None} drops the only
    version-dependent text chunk (PNG output carries no date).
    """
    import io

    try:
        import matplotlib
        import matplotlib.style
    except ImportError as e:
        raise InfQuantError("report: drawing ppl_by_domain.png and vram.png needs matplotlib, which is not "
                            "installed; install it with: pip install 'matplotlib>=3.7'") from e

    rc = {"font.family": "sans-serif", "font.sans-serif": [FONT], "font.size": 10}
    with matplotlib.style.context("default"), matplotlib.rc_context(rc):
        fig = _new_figure(*size)
        draw(fig, report)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def render_ppl_png(report: VerifyReport) -> bytes:
    """ppl_by_domain.png: per domain, bf16 vs quantized perplexity as grouped bars."""
    return _png_bytes(_draw_ppl, report, (8.0, 4.5))


def _draw_ppl(fig, report: VerifyReport) -> None:
    metrics, name = report.metrics, model_name(report)
    domains = ordered_domains(metrics)
    ax = fig.add_subplot()
    ax.set_title(f"Perplexity by domain: bf16 vs {name}")
    if not domains:
        ax.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax.transAxes)
        return
    x, w = list(range(len(domains))), 0.38
    base = [metrics[d].ppl_baseline for d in domains]
    quant = [metrics[d].ppl_quantized for d in domains]
    b = ax.bar([i - w / 2 for i in x], base, w, label="bf16", color="#4C72B0")
    q = ax.bar([i + w / 2 for i in x], quant, w, label=report.quantized.quant_method.upper()
               + f" {report.quantized.bits}-bit", color="#DD8452")
    ax.bar_label(b, fmt="%.2f", padding=2, fontsize=8)
    ax.bar_label(q, labels=[f"{v:.2f}\n({signed_pct(metrics[d].ppl_increase_pct, 1)})" for d, v in zip(domains, quant)],
                 padding=2, fontsize=8)
    ax.set_xticks(x, [f"{d}\n{metrics[d].tokens:,} tok" for d in domains])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_ylim(0, max(base + quant) * 1.22)
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def render_vram_png(report: VerifyReport) -> bytes:
    """vram.png: the analytic breakdown as one stacked bar, the budget as a line, the measured peak below."""
    return _png_bytes(_draw_vram, report, (9.0, 4.0))


def _draw_vram(fig, report: VerifyReport) -> None:
    a, m = report.vram.analytic, report.vram.measured
    ax = fig.add_subplot()
    rows = [f"analytic\ncontext {a['context']:,}"] + ([f"measured\ncontext {m['context']:,}"] if m else [])
    y = list(range(len(rows)))[::-1]               # analytic on top
    left = 0.0
    for key, label, colour in VRAM_PARTS:
        ax.barh(y[0], a[key] / GIB, left=left, height=BAR_HEIGHT, color=colour,
                label=f"{label} {_gib(a[key])} GiB")
        left += a[key] / GIB
    _bar_total(ax, left, y[0], a["total_bytes"])
    right = max(a["budget_bytes"], a["total_bytes"])
    if m:
        right = max(right, _draw_measured(ax, y[1], m))
    ax.axvline(a["budget_bytes"] / GIB, color="#C44E52", linestyle="--", linewidth=1.5, zorder=4,
               label=f"budget {_gib(a['budget_bytes'])} GiB")
    ax.set_yticks(y, rows)
    ax.set_xlim(0, right / GIB * 1.18)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("GiB")
    ax.set_title(f"{model_name(report)}: VRAM, batch {a['batch']}, KV {a['kv_dtype']} "
                 f"({'fits' if a['fits'] else 'does NOT fit'})")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()   # the budget line comes first; show it last
    fig.legend(handles[1:] + handles[:1], labels[1:] + labels[:1], loc="outside lower center", ncol=3,
               fontsize=8, frameon=False)


def _bar_total(ax, x_gib: float, y: float, total_bytes: int) -> None:
    """The bar's total at its end, on a white box so the budget line cannot strike through it."""
    ax.annotate(f"{_gib(total_bytes)} GiB", (x_gib, y), xytext=(4, 0), textcoords="offset points", va="center",
                fontsize=9, zorder=5, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})


def _draw_measured(ax, y: float, m: dict) -> int:
    """Measured peaks as one bar: allocated, then reserved on top of it, then the rest of the process' use.

    Returns the largest measured number in bytes (for the x limit).
    """
    parts = [("peak_allocated_bytes", "measured: allocated", "#2F4B7C", None),
             ("peak_reserved_bytes", "measured: reserved, unallocated", "#7A8FB8", "//"),
             ("process_used_bytes", "measured: rest of process", "#BCC6DA", "..")]
    done = 0
    for key, label, colour, hatch in parts:
        value = m.get(key)
        if value is None or value <= done:
            continue
        ax.barh(y, (value - done) / GIB, BAR_HEIGHT, left=done / GIB, color=colour, hatch=hatch, edgecolor="white",
                linewidth=0, label=f"{label} {_gib(value - done)} GiB")
        done = value
    _bar_total(ax, done / GIB, y, done)
    return done
