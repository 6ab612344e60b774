"""Every GPTQ layout inf-quant writes, dequantized by gptqmodel after a plain `from_pretrained`, equals ours exactly.

One tiny Llama checkpoint is quantized once per layout (act-order, static groups, asymmetric, 8-bit, per-channel,
group-aware); one clean interpreter (no inf_quant) loads all the outputs through transformers -> optimum ->
gptqmodel and saves, for every quantized Linear, the weight gptqmodel's kernel dequantizes from the buffers it
loaded (after its GPTQ v1 -> v2 qzeros conversion, before any forward repacks them) and the g_idx it holds.
Those are compared with `qformat.from_tensors` over the tensors we wrote.

gptqmodel's `dequantize_weight()` computes `scales[g_idx] * (codes - zeros[g_idx])` with the checkpoint's fp16
scales, so its product is rounded to fp16. The exact product of an fp16 scale (11 significant bits) and an
integer |code - zero| < 256 fits fp32's 24-bit significand, so ours (fp32) rounded once to fp16 must equal theirs
bit for bit; and the same call with the scales upcast to fp32 must equal ours in fp32 bit for bit (codes, zeros and
g_idx, free of any rounding). Both comparisons are exact. (The forward itself is not compared: TorchAtenLinear's
CPU inference path repacks to int4 and runs in bf16 with bf16 scales.)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import run_clean
from inf_quant.core.config import (CalibConfig, Device, GPTQConfig, Method, ModelConfig, Order, OutputConfig, Recipe,
                                   RunConfig)
from inf_quant.core.paths import CALIBRATION
from inf_quant.pipeline import quantize
from inf_quant.quant.pack import unpack_gptq_qzeros
from inf_quant.quant.qformat import from_tensors
from tiny import build_tiny_checkpoint

pytestmark = pytest.mark.slow  # quantizes one checkpoint per GPTQ layout and loads them all through gptqmodel

G = 32
LAYOUTS = {  # name -> GPTQConfig overrides of 4-bit sym g32
    "act": dict(order=Order.ACT),                             # desc_act, unsorted g_idx
    "act-static": dict(order=Order.ACT, static_groups=True),  # desc_act with g_idx = i // G
    "asym": dict(sym=False),                                  # zero points vary per group
    "w8": dict(bits=8),
    "per-channel": dict(group_size=-1),
    "group-aware": dict(order=Order.GROUP_AWARE),
}
LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

LOADER = r"""
import json, sys, torch, transformers
from safetensors.torch import save_file
info = {}
for layout, out in OUTS.items():
    m = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                          device_map="cpu")
    oq = m.hf_quantizer.optimum_quantizer  # what optimum hands gptqmodel's kernel selection
    mods, tensors = {}, {}
    for name, mod in m.named_modules():
        if not hasattr(mod, "qweight"):
            continue
        # the class's own method: the instance attribute may be a torch.compile wrapper of this same function
        deq = type(mod).dequantize_weight
        w16 = deq(mod)
        scales = mod.scales
        mod.scales = scales.float()
        w32 = deq(mod)
        mod.scales = scales
        tensors[name + ".w16"] = w16.contiguous()
        tensors[name + ".w32"] = w32.contiguous()
        tensors[name + ".g_idx"] = mod.g_idx.contiguous()
        mods[name] = dict(kernel=type(mod).__name__, bits=mod.bits, group_size=mod.group_size,
                          desc_act=bool(mod.desc_act), sym=bool(mod.sym), qzero_format=mod.qzero_format(),
                          scales_dtype=str(scales.dtype))
    save_file(tensors, f"{DUMP}/{layout}.safetensors")
    info[layout] = dict(quantizer=dict(bits=oq.bits, group_size=oq.group_size, desc_act=oq.desc_act, sym=oq.sym),
                        modules=mods)
    del m
assert "inf_quant" not in sys.modules
print(json.dumps(info))
"""


def _small_calibration(path):
    """The bundled calibration set's first records, ~6k characters: tokenizing all of it is most of a tiny run."""
    text, n = [], 0
    with open(CALIBRATION, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            text.append(t)
            n += len(t)
            if n > 6000:
                break
    path.write_text("\n\n".join(text), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader-exact")
    model = build_tiny_checkpoint(root / "bf16", "llama", seed=0)
    calib = _small_calibration(root / "calib.txt")
    outs, failed = {}, {}
    for layout, kw in LAYOUTS.items():
        out = root / layout
        cfg = GPTQConfig(**{"bits": 4, "group_size": G, **kw})
        try:
            quantize(Recipe(method=Method.GPTQ, model=ModelConfig(path=str(model)),
                            calibration=CalibConfig(source=str(calib), samples=8, seqlen=32), gptq=cfg,
                            run=RunConfig(device=Device.CPU), output=OutputConfig(dir=str(out))))
            outs[layout] = str(out)
        except Exception as e:  # reported by that layout's test, the others still run
            failed[layout] = e
    dump = root / "loaded"
    dump.mkdir()
    info = run_clean(f"OUTS, DUMP = {outs!r}, {str(dump)!r}\n" + LOADER) if outs else {}
    return root, outs, failed, info, dump


def _ours(out) -> dict[str, dict[str, torch.Tensor]]:
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                module, suffix = k.rsplit(".", 1)
                if suffix in ("qweight", "qzeros", "scales", "g_idx"):
                    by_module.setdefault(module, {})[suffix] = h.get_tensor(k)
    return by_module


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gptqmodel_dequantizes_exactly_our_weights(loaded, layout):
    root, outs, failed, info, dump = loaded
    if layout in failed:
        raise failed[layout]
    kw = LAYOUTS[layout]
    bits, sym, group_size = kw.get("bits", 4), kw.get("sym", True), kw.get("group_size", G)
    desc_act = kw.get("order") is Order.ACT
    out = root / layout
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["bits"], q["group_size"], q["sym"], q["desc_act"], q["static_groups"]) == (
        bits, group_size, sym, desc_act, bool(kw.get("static_groups")))

    got = info[layout]
    # what optimum read from our config and handed gptqmodel's kernel selection
    assert got["quantizer"] == dict(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    ours = _ours(out)
    assert sorted(ours) == sorted(got["modules"]) == sorted(LINEARS)
    theirs = load_file(dump / f"{layout}.safetensors")
    for name, t in ours.items():
        mod = got["modules"][name]
        k = t["g_idx"].numel()
        assert mod["bits"] == bits and mod["qzero_format"] == 2 and mod["scales_dtype"] == "torch.float16", (name, mod)
        assert mod["group_size"] == (k if group_size == -1 else group_size), (name, mod)  # -1 loads as G = K
        # optimum 2.3 builds the kernel as quant_linear(bits, group_size, desc_act, sym, ...) but gptqmodel 7.6's
        # kernels take (bits, group_size, sym, desc_act, ...): the module attributes come out swapped. The CPU
        # kernels never read them (selection uses the right keyword values, checked above); pinned here so a
        # change in either package shows.
        assert (mod["desc_act"], mod["sym"]) == (sym, desc_act), (name, mod)

        g_idx = theirs[name + ".g_idx"]
        assert torch.equal(g_idx.long(), t["g_idx"].long()), f"{name}: g_idx as loaded differs from ours"
        trivial = torch.arange(k) // (k if group_size == -1 else group_size)
        if layout == "act":
            assert not torch.equal(t["g_idx"].long(), trivial), f"{name}: act-order wrote a trivial g_idx"
        else:
            assert torch.equal(t["g_idx"].long(), trivial), name

        want = from_tensors(t, Method.GPTQ, bits, k).T  # [K, N] fp32, like gptqmodel's dequantize_weight
        w32, w16 = theirs[name + ".w32"], theirs[name + ".w16"]
        assert w32.dtype == torch.float32 and w16.dtype == torch.float16 and w32.shape == want.shape, name
        bad = (w32 != want).sum().item()
        assert bad == 0, f"{name}: {bad} of {want.numel()} weights differ (fp32 scales)"
        bad16 = (w16 != want.half()).sum().item()
        assert bad16 == 0, f"{name}: {bad16} of {want.numel()} weights differ from ours rounded to fp16"

    zeros = torch.cat([unpack_gptq_qzeros(t["qzeros"], bits, t["scales"].shape[1]).flatten() for t in ours.values()])
    if sym:
        assert torch.equal(zeros.unique(), torch.tensor([2 ** (bits - 1)], dtype=zeros.dtype))
    else:  # the point of this layout: zero points all over [1, 2**bits), where a qzeros bug would show
        assert zeros.unique().numel() >= 8 and int(zeros.min()) >= 1, zeros.unique()
