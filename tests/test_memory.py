"""Memory is stated, then measured: the expected peak of a quantization run (memory.expected_quantize_peak)
against the measured RSS of a real run on a mid-size checkpoint, and verify's peak against the number of eval
windows. Each run is a fresh process (a high-water mark is per process). glibc's heap keeps freed chunks of up
to 32 MB for reuse, which puts 0.1-0.2 GiB of allocator slack into RSS that no shape predicts; the children run
with MALLOC_MMAP_THRESHOLD_=65536 so that RSS is the working set, except the check that verify's scoring does not
grow under glibc's defaults either. Cost: about 2.5 min on an idle 2-core box.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inf_quant.engine.memory import MEMORY_MARGIN
from tiny import build_tiny_checkpoint

pytestmark = pytest.mark.slow  # measures real runs' peak RSS in child processes (~3.5 min)

MID = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
           num_key_value_heads=2)


def _run(*args: str, glibc_defaults: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    if glibc_defaults:
        env.pop("MALLOC_MMAP_THRESHOLD_")
    code = "import sys; from inf_quant.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=900)


def test_quantize_peak_rss_is_as_expected(tmp_path):
    model = build_tiny_checkpoint(tmp_path / "mid", "inflm", max_shard_bytes=10**9, **MID)
    r = _run("gptq", "--bits", "4", "--model", model, "--out", tmp_path / "q", "--samples", "16", "--seqlen", "512",
             "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    expected, measured = s["expected_peak_bytes"] - s["base_rss_bytes"], s["peak_rss_bytes"] - s["base_rss_bytes"]
    assert expected > 100 * 2**20   # the shapes dominate: 2 x 32 MiB hidden states, a 44 MiB layer, 4 x H of 30 MiB
    print(f"quantize peak above base: measured {measured / 2**20:.1f} MiB, expected {expected / 2**20:.1f} MiB")
    assert abs(measured / expected - 1) <= MEMORY_MARGIN, (measured / 2**20, expected / 2**20)


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory):
    """A 1-layer model wide enough (hidden 1024) that the hidden states of 128 windows (64 MiB) would show."""
    root = tmp_path_factory.mktemp("verify-mem")
    base = build_tiny_checkpoint(root / "bf16", "inflm", max_shard_bytes=10**9, hidden_size=1024,
                                 intermediate_size=1024, num_hidden_layers=1, num_attention_heads=16,
                                 num_key_value_heads=2)
    r = _run("gptq", "--bits", "4", "--model", base, "--out", root / "q", "--samples", "8", "--seqlen", "128",
             "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    return base, root / "q"


def _verify_peak(base, quant, tmp, windows: int, baseline_gib: float, glibc_defaults: bool = False,
                 seqlen: int = 128) -> tuple[int, int]:
    """What verify's two phases add at their peaks: (the layer-streamed baseline, the quantized model's scoring)."""
    report = tmp / f"report-{windows}-{baseline_gib}-{glibc_defaults}-{seqlen}"
    r = _run("verify", quant, "--baseline", base, "--seqlen", seqlen, "--max-windows", windows, "--top-k", "4",
             "--baseline-gib", baseline_gib, "--device", "cpu", "--json", "--report", report, "--cache-dir", report / "cache",
             glibc_defaults=glibc_defaults)   # never a cached baseline
    assert r.returncode in (0, 1), r.stderr[-2000:]      # 1: a gate failed (a random model); the peak is recorded
    own = json.loads(r.stdout.strip().splitlines()[-1])["vram"]["verify"]   # measured: --json, not the file
    assert "measured_bytes" not in json.loads((report / "verify.json").read_text())["vram"]["verify"]
    assert abs(own["windows"] - windows) <= 4 and own["what"] == "host RSS"   # each domain's share, rounded
    assert own["hwm_reset"]
    return own["phases"]["baseline"]["added_bytes"], own["phases"]["scoring"]["added_bytes"]


def test_verify_peak_does_not_grow_with_eval_windows(wide_pair, tmp_path):
    base, quant = wide_pair
    per_pass = 8 * 128 * 1024 * 4 / 2**30   # 8 windows per baseline pass (the 2nd pass on holds ~16 MiB more than the 1st)
    few, many = _verify_peak(base, quant, tmp_path, 16, per_pass), _verify_peak(base, quant, tmp_path, 128, per_pass)
    print(f"verify peaks above each phase's start (baseline, scoring): {few[0] / 2**20:.1f}, {few[1] / 2**20:.1f} "
          f"MiB (16 windows); {many[0] / 2**20:.1f}, {many[1] / 2**20:.1f} MiB (128)")
    for f, m in zip(few, many):
        assert abs(m / f - 1) < 0.10, (few, many)
    # the check can fail: with every window in one pass, the 128 windows' hidden states (64 MiB) do show
    unbounded = _verify_peak(base, quant, tmp_path, 128, 64.0)
    print(f"... and {unbounded[0] / 2**20:.1f} MiB for the baseline with the 128 windows in one pass")
    assert unbounded[0] - many[0] > 40 * 2**20, (many, unbounded)


@pytest.fixture(scope="module")
def glibc_peaks(wide_pair, tmp_path_factory):
    """verify's (baseline, scoring) peaks at 16 and 128 windows of 512 tokens under glibc's default heap."""
    base, quant = wide_pair
    tmp = tmp_path_factory.mktemp("glibc")
    per_pass = 8 * 128 * 1024 * 4 / 2**30
    return tuple(_verify_peak(base, quant, tmp, n, per_pass, glibc_defaults=True, seqlen=512) for n in (16, 128))


def test_verify_scoring_does_not_grow_with_eval_windows_under_glibc_defaults(glibc_peaks):
    """As users run it (glibc's default heap): small results kept per chunk used to pin the heap above each
    chunk's freed logits, so the scoring phase's RSS grew with the eval set (+0.9 GiB on the bundled model's 180
    windows); the results are now allocated once."""
    few, many = glibc_peaks[0][1], glibc_peaks[1][1]
    print(f"scoring peak above its start, glibc defaults: {few / 2**20:.1f} MiB (16 windows), "
          f"{many / 2**20:.1f} MiB (128)")
    # measured before the fix: 109 -> 416 MiB (+307); after it, in separate runs (2026-12-07): 39 -> 66, 75 -> 94,
    # 87 -> 87, 79 -> 89 MiB: the phase's starting point moves by tens of MiB of heap slack run to run, in either
    # direction, not with the window count. 64 MiB keeps ~5x between fixed and unfixed without failing on that slack.
    assert many - few < max(0.10 * few, 64 * 2**20), (few / 2**20, many / 2**20)


def test_verify_baseline_does_not_grow_with_eval_windows_under_glibc_defaults(glibc_peaks):
    """The baseline phase's twin (issue 22): each window's top-k results, kept as small tensors, pinned glibc's
    heap above the window's freed logits [T, V] fp32 (16 MiB here, under glibc's 32 MiB mmap ceiling), so the
    baseline's RSS grew with the eval set (0.48 / 1.07 / 3.12 GiB for 20 / 60 / 180 windows of the bundled model);
    the results are now allocated once, up front."""
    few, many = glibc_peaks[0][0], glibc_peaks[1][0]
    print(f"baseline peak above its start, glibc defaults: {few / 2**20:.1f} MiB (16 windows), "
          f"{many / 2**20:.1f} MiB (128)")
    # The results themselves are meant to grow (target [S, T-1] fp32 + top-4 log-probs and ids, 2 MiB more at 128
    # windows). Measured: 133 -> 2072 MiB before the fix; after it 120-140 -> 134-142 MiB in the helper's runs and
    # 137 -> 162 MiB in a fresh-clone CI run (2 vs 16 passes leave tens of MiB of heap slack between passes, not
    # per window), so results + 48 MiB still separates fixed from unfixed by ~40x.
    results = (128 - 16) * 511 * (4 + 4 * 8)
    assert many - few < results + max(0.15 * few, 48 * 2**20), (few / 2**20, many / 2**20)
