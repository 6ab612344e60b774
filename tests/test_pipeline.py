"""`inf-quant gptq` and `inf-quant awq` end to end on tiny INF (LayerNorm+bias) and Llama (RMSNorm) checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import cli, run_clean, tree_hashes
from inf_quant.core.config import AWQConfig, CalibConfig, GPTQConfig, Method, ModelConfig, Order, OutputConfig, Recipe
from inf_quant.evaluate.reference import load_dequantized
from inf_quant.pipeline import quantize
from tiny import build_tiny_checkpoint
from tolerances import BACKEND_VS_REFERENCE_LOGITS_ATOL, PIPELINE_GPTQ_MIN_GAIN_OVER_RTN

pytestmark = pytest.mark.slow  # `gptq` and `awq` end to end on five tiny checkpoints

FAST = ("--group-size", "32", "--samples", "8", "--seqlen", "64", "-q")
IDS = [[5, 17, 250, 1024, 7, 3000, 42, 99, 512, 8000, 6, 77]]


VARIANTS = {"gptq": (), "awq": (), "awq-rtn": ("--solve", "rtn"), "gptq-nosmooth": ("--smooth", "none"),
            "gptq-module": ("--smooth", "awq", "--smooth-loss", "module")}


@pytest.fixture(scope="module", params=[("gptq", "inflm"), ("gptq", "llama"), ("awq", "inflm"), ("awq", "llama"),
                                        ("awq-rtn", "inflm"), ("gptq-nosmooth", "inflm"),
                                        ("gptq-module", "llama")], ids=lambda p: "-".join(p))
def quantized(request, tmp_path_factory):
    """awq-rtn: AutoAWQ's clip search + round to nearest (--solve rtn) instead of the default GPTQ solve;
    gptq (the default, smooth auto at 4 bits): AWQ's scales (diag loss) folded into the norms (LayerNorm: weight and
    bias) and v/up_proj, then the GPTQ solve; gptq-nosmooth: the solve alone; gptq-module: the scales scored by
    AutoAWQ's module-output loss."""
    variant, kind = request.param
    root = tmp_path_factory.mktemp(f"{variant}-{kind}")
    model = build_tiny_checkpoint(root / "bf16", kind)
    out = root / "w4"
    method = variant.split("-")[0]
    assert cli(method, "--bits", "4", "--model", model, "--out", out, *FAST, *VARIANTS[variant])[0] == 0
    return method, kind, model, out


def _tensors(out):
    tensors = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_slice(k) for k in h.keys()})
    return tensors


def test_output_is_standard_gptq_v1(quantized):
    method, kind, model, out = quantized
    if method != "gptq":
        pytest.skip("GPTQ layout")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "quantize_config.json", "tokenizer.model", "tokenizer_config.json",
            "inf_quant.json"} <= names
    assert ("modeling_inflm.py" in names) == (kind == "inflm")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q | {"meta": None} == q | {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                      "sym": True, "checkpoint_format": "gptq", "true_sequential": True,
                                      "damp_percent": 0.01, "meta": None}
    tensors = _tensors(out)
    smoothed = json.loads((out / "inf_quant.json").read_text())["recipe"]["gptq"]["smooth"] in ("auto", "awq")
    src = _tensors(model)   # a smoothed output's norms carry the scales; otherwise they are copied unchanged
    for n in ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight"):
        if f"model.layers.1.{n}" in src:  # RMSNorm: no bias
            a, b = src[f"model.layers.1.{n}"][:], tensors[f"model.layers.1.{n}"][:]
            assert a.dtype == b.dtype and torch.equal(a, b) != smoothed, n
    p = "model.layers.1.mlp.down_proj."  # K = 192, N = 64, G = 32
    assert tensors[p + "qweight"].get_dtype() == "I32" and tensors[p + "qweight"].get_shape() == [192 // 8, 64]
    assert tensors[p + "qzeros"].get_shape() == [6, 64 // 8] and tensors[p + "qzeros"].get_dtype() == "I32"
    assert tensors[p + "scales"].get_shape() == [6, 64] and tensors[p + "scales"].get_dtype() == "F16"
    assert tensors[p + "g_idx"].get_shape() == [192] and tensors[p + "g_idx"].get_dtype() == "I32"
    assert not any(k.endswith("proj.weight") for k in tensors)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert tensors[k].get_dtype() == "BF16", k
    assert ("model.norm.bias" in tensors) == (kind == "inflm")


def test_output_is_standard_awq_gemm(quantized):
    method, kind, model, out = quantized
    if method != "awq":
        pytest.skip("AWQ layout")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                 "modules_to_not_convert": ["lm_head"]}
    assert not (out / "quantize_config.json").exists()
    tensors = _tensors(out)
    p = "model.layers.1.mlp.down_proj."  # K = 192, N = 64, G = 32
    assert tensors[p + "qweight"].get_shape() == [192, 64 // 8] and tensors[p + "qweight"].get_dtype() == "I32"
    assert tensors[p + "qzeros"].get_shape() == [6, 64 // 8] and tensors[p + "qzeros"].get_dtype() == "I32"
    assert tensors[p + "scales"].get_shape() == [6, 64] and tensors[p + "scales"].get_dtype() == "F16"
    assert p + "g_idx" not in tensors
    # the scales were folded into the norms: they differ from the input's (weight, and bias for LayerNorm)
    from inf_quant.read.load import open_checkpoint

    src = open_checkpoint(model)
    for name in ["model.layers.0.input_layernorm.weight"] + (["model.layers.0.input_layernorm.bias"]
                                                             if kind == "inflm" else []):
        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as h:
            folded = h.get_tensor(name)
        assert not torch.equal(folded, src.read([name])[name]), name


def test_plain_transformers_loads_generates_and_matches_reference(quantized):
    method, kind, _, out = quantized
    got = run_clean(
        "import json, sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, "
        "device_map='cpu', dtype=torch.bfloat16)\n"
        "assert 'inf_quant' not in sys.modules\n"
        f"ids = torch.tensor({IDS})\n"
        "with torch.no_grad(): logits = m(ids).logits[0].float()\n"
        "gen = m.generate(ids, max_new_tokens=6, do_sample=False)\n"
        "print(json.dumps({'kernel': type(m.model.layers[0].mlp.down_proj).__name__, "
        "'logits': logits.tolist(), 'gen': gen[0].tolist()}))\n")
    assert "Linear" in got["kernel"] and got["kernel"] != "Linear", got["kernel"]
    assert len(got["gen"]) == len(IDS[0]) + 6
    ref = load_dequantized(out, torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor(IDS)).logits[0]
    diff = (torch.tensor(got["logits"]) - want).abs().max().item()
    assert diff <= BACKEND_VS_REFERENCE_LOGITS_ATOL, f"{kind}: backend vs dequantized reference max |diff| {diff}"


def test_gptq_beats_rtn_on_the_model_output(quantized):
    """Sanity of the whole loop: the GPTQ model is closer to bf16 than round-to-nearest is, by a margin, even on
    random tokens. (AWQ only promises not to lose on its own calibration data - unit-tested in test_awq.py; on the
    bundled language model its perplexity is checked in test_bundled.py.)"""
    method, kind, model, out = quantized
    if method != "gptq":
        pytest.skip("GPTQ only")
    from transformers import AutoModelForCausalLM

    import inf_quant  # noqa: F401
    from inf_quant.quant.grid import dequantize_weight, rtn_quantize

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    rtn = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in rtn.named_modules():
            if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(dequantize_weight(rtn_quantize(mod.weight, 4, 32, method == "gptq")))
        ids = torch.randint(0, 8192, (4, 64), generator=torch.Generator().manual_seed(1))
        ref = base(ids).logits
        err_gptq = (load_dequantized(out)(ids).logits - ref).pow(2).mean()
        err_rtn = (rtn(ids).logits - ref).pow(2).mean()
    gain = 1 - (err_gptq / err_rtn).item()
    assert gain >= PIPELINE_GPTQ_MIN_GAIN_OVER_RTN, (kind, err_gptq.item(), err_rtn.item(), gain)


def _recipe(model, out, method="gptq", resume=False, **kw) -> Recipe:
    """kw: GPTQ settings (gptq's, or awq's GPTQ solve); the grid is g32 either way (a recipe sets only the keys its
    method reads)."""
    grid = {"gptq": GPTQConfig(bits=4, group_size=32, **kw)} if method == "gptq" else \
        {"gptq": GPTQConfig(**kw), "awq": AWQConfig(group_size=32)}
    return Recipe(method=Method(method), model=ModelConfig(path=str(model)),
                  calibration=CalibConfig(samples=8, seqlen=64), output=OutputConfig(dir=str(out), resume=resume),
                  **grid)


def test_unproven_cuda_paths_are_recipe_fields_in_one_spelling():
    """The opt-in CUDA paths are chosen in the recipe (recorded in the output and the resume fingerprint), never by
    the environment; their order does not change the recipe."""
    from inf_quant.core.config import CudaPath, RunConfig, from_dict, to_dict

    a = RunConfig(unproven_cuda=(CudaPath.GRAPH_COLUMNS, CudaPath.BF16_HESSIAN))
    b = from_dict(RunConfig, {"unproven_cuda": ["bf16-hessian", "graph-columns", "bf16-hessian"]}, "run")
    assert a == b and to_dict(a)["unproven_cuda"] == ["bf16-hessian", "graph-columns"]
    assert to_dict(RunConfig())["unproven_cuda"] == []


@pytest.mark.parametrize("method, kw", [("gptq", {"order": Order.ACT}), ("awq", {})])
def test_two_runs_are_byte_identical(tmp_path, inflm_ckpt, method, kw):
    a, b = tmp_path / "a", tmp_path / "b"
    quantize(_recipe(inflm_ckpt, a, method, **kw))
    quantize(_recipe(inflm_ckpt, b, method, **kw))
    ha, hb = tree_hashes(a), tree_hashes(b)
    ha.pop("inf_quant.json"), hb.pop("inf_quant.json")  # the only file naming the output; recipe differs by dir
    assert ha == hb and any(n.endswith(".safetensors") for n in ha)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_resume_after_interruption_gives_identical_bytes(tmp_path, inflm_ckpt, method):
    full = tmp_path / "full"
    quantize(_recipe(inflm_ckpt, full, method))
    out = tmp_path / "resumed"

    def crash(result, total):
        if result.index == 0:
            raise KeyboardInterrupt  # as if killed after layer 0 was saved

    with pytest.raises(KeyboardInterrupt):
        quantize(_recipe(inflm_ckpt, out, method), progress=crash)
    assert not out.exists(), "nothing may be published before the run completes"
    assert (tmp_path / ".resumed.partial" / "layer-00000.safetensors").is_file()
    seen = []
    report = quantize(_recipe(inflm_ckpt, out, method, resume=True), progress=lambda r, n: seen.append(r.resumed))
    assert seen == [True, False]
    assert report.summary()["resumed_layers"] == 1
    ha, hb = tree_hashes(full), tree_hashes(out)
    ha.pop("inf_quant.json"), hb.pop("inf_quant.json")
    assert ha == hb
    assert not (tmp_path / ".resumed.partial").exists()


def test_layer_writer_writes_behind_and_raises_its_failures(tmp_path, monkeypatch):
    """Finished layers are written on a background thread: the file holds what was saved, a failed write is
    raised at the next save (not lost), and leaving the writer waits for the write in flight."""
    from inf_quant.save.output import LayerWriter, WorkDir

    work = WorkDir(tmp_path)
    t = {"a.qweight": torch.arange(12, dtype=torch.int32).reshape(3, 4), "a.scales": torch.ones(2, 4).half()}
    with LayerWriter(work) as writer:
        writer.save(0, t)
    with safe_open(str(work.layer_file(0)), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in t.items())

    def broken(self, i, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WorkDir, "save_layer", broken)
    with pytest.raises(OSError, match="No space left"), LayerWriter(work) as writer:
        writer.save(1, t)
        writer.save(2, t)
        pytest.fail("the failed write of layer 1 was not raised")
    assert not work.layer_file(1).exists()


def test_asymmetric_zero_point_of_zero_is_refused_not_written_broken(tmp_path, capsys):
    """gptqmodel's v1->v2 conversion corrupts a stored zero of 0; inf-quant refuses instead of writing it."""
    model = build_tiny_checkpoint(tmp_path / "m", "llama")
    from safetensors.torch import load_file

    from inf_quant.save.write import save_file

    shard = next(p for p in model.glob("*.safetensors")
                 if "model.layers.0.mlp.up_proj.weight" in load_file(p))
    t = {k: v.clone() for k, v in load_file(shard).items()}
    t["model.layers.0.mlp.up_proj.weight"][0, :32] = t["model.layers.0.mlp.up_proj.weight"][0, :32].abs()  # group >= 0
    save_file(t, shard, metadata={"format": "pt"})
    code, _, err = cli("gptq", "--model", model, "--out", tmp_path / "o", "--no-sym", *FAST, capsys=capsys)
    assert code == 2 and "model.layers.0.mlp.up_proj: a zero point of 0" in err and "--sym" in err
    assert not (tmp_path / "o").exists()


def test_input_licence_files_are_shipped(tmp_path, capsys):
    model = build_tiny_checkpoint(tmp_path / "m", "inflm")
    (model / "LICENSE").write_text("INF licence text\n")
    (model / "NOTICE.txt").write_text("notice\n")
    assert cli("gptq", "--model", model, "--out", tmp_path / "o", *FAST, capsys=capsys)[0] == 0
    assert (tmp_path / "o" / "LICENSE").read_text() == "INF licence text\n"
    assert (tmp_path / "o" / "NOTICE.txt").is_file()
    assert "LICENSE" in json.loads((tmp_path / "o" / "inf_quant.json").read_text())["copied_from_input"]


def test_existing_output_is_never_overwritten_without_force(tmp_path, inflm_ckpt, capsys):
    out = tmp_path / "out"
    assert cli("gptq", "--model", inflm_ckpt, "--out", out, *FAST, capsys=capsys)[0] == 0
    (out / "keep.txt").write_text("precious")
    code, _, err = cli("gptq", "--model", inflm_ckpt, "--out", out, *FAST, capsys=capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").is_file()
    code, _, _ = cli("gptq", "--model", inflm_ckpt, "--out", out, "--force", *FAST, capsys=capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # --force replaces only what inf-quant wrote (issue 22): a directory without inf_quant.json is refused
    (out / "inf_quant.json").unlink()
    code, _, err = cli("gptq", "--model", inflm_ckpt, "--out", out, "--force", *FAST, capsys=capsys)
    assert code == 2 and "is not an inf-quant output" in err and (out / "config.json").is_file()


@pytest.mark.parametrize("args, message", [
    (("--model", "/nonexistent/model"), "not a directory"),
    (("--seqlen", "100000"), "exceeds the model's max_position_embeddings=512"),
    (("--group-size", "48"), "model.layers.0.self_attn.q_proj: in_features=64 is not divisible by group_size=48"),
    (("--calib", "/nonexistent.jsonl"), "no such file"),
    (("--device", "cpu", "--unproven-cuda", "graph-columns"), "names CUDA-only paths but this run is on cpu"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, inflm_ckpt, capsys, args, message):
    base = ["--model", str(inflm_ckpt), "--out", str(tmp_path / "o"), "--samples", "4", "-q"]
    if "--group-size" not in args:
        base += ["--group-size", "32"]
    code, out, err = cli("gptq", *base, *args, capsys=capsys)
    lines = [line for line in err.splitlines() if line.startswith("inf-quant")]
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_the_layer_halves_compose_to_the_whole_layer_exactly(tiny_ckpt):
    """gptq_block captures the MLP groups from the attention half's output instead of re-running attention;
    that is only the same math if the halves of LayerMap.halves are the layer, bit for bit."""
    from inf_quant.engine.forward import run_block, run_half
    from inf_quant.read.load import hf_config, load_block, open_checkpoint, rotary, skeleton

    ck = open_checkpoint(tiny_ckpt)
    cfg = hf_config(ck)
    block = load_block(ck, skeleton(cfg), 1, "cpu", torch.float32)
    x = torch.randn(3, 20, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    rope = rotary(cfg, "cpu")(x[:1], torch.arange(20)[None])
    with torch.no_grad():
        h = x
        for half in ck.layer_map.halves:
            h = run_half(block, half, h, rope)
        assert torch.equal(h, run_block(block, x, rope))
        # each half is x + its output linear (LayerMap.half_outputs) on that linear's input, bit for bit:
        # gptq_block finishes the attention half from o_proj's captured input instead of re-running attention
        h = x
        for half, out_name in zip(ck.layer_map.halves, ck.layer_map.half_outputs):
            seen = []
            handle = block.get_submodule(out_name).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
            full = run_half(block, half, h, rope)
            handle.remove()
            assert torch.equal(full, h + block.get_submodule(out_name)(seen[0])), out_name
            h = full
