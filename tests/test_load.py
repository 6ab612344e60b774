"""The streaming loader: per-layer tensors equal a full load, layer-by-layer reads, bounded memory, pickle refusal."""

import gc
import json

import psutil
import pytest
import torch

import inf_quant  # noqa: F401
from inf_quant.core.errors import CheckpointError
from inf_quant.read.load import hf_config, load_block, load_named, open_checkpoint, skeleton
from tiny import build_tiny_checkpoint


def test_streamed_layers_equal_full_load(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint(tiny_ckpt)
    assert len(ckpt.files) >= 3, "the fixture must be multi-shard"
    full = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16).state_dict()
    skel = skeleton(hf_config(ckpt))
    seen = set()
    for i in range(ckpt.num_layers):
        block = load_block(ckpt, skel, i, "cpu", torch.bfloat16)
        for k, v in block.state_dict().items():
            name = f"model.layers.{i}.{k}"
            assert torch.equal(v, full[name]), name
            seen.add(name)
    for name in ("model.embed_tokens", "model.norm", "lm_head"):
        for k, v in load_named(ckpt, skel, name, "cpu", torch.bfloat16).state_dict().items():
            assert torch.equal(v, full[f"{name}.{k}"])
            seen.add(f"{name}.{k}")
    assert seen == set(full)



def _spy_reads(monkeypatch):
    """Record every tensor name the loader reads from a shard (host reads: read_safetensors)."""
    import inf_quant.read.load as load

    asked, real = [], load.read_safetensors

    def spy(path, keys, *header):
        asked.extend(keys)
        return real(path, keys, *header)

    monkeypatch.setattr(load, "read_safetensors", spy)
    return asked


def test_layer_reads_touch_only_that_layer(tiny_ckpt, monkeypatch):
    """Reading layer i asks the shards for layer i's tensors and nothing else."""
    ckpt = open_checkpoint(tiny_ckpt)
    asked = _spy_reads(monkeypatch)
    skel = skeleton(hf_config(ckpt))
    load_block(ckpt, skel, 1, "cpu", torch.bfloat16)
    assert asked and all(n.startswith("model.layers.1.") for n in asked)
    assert len(asked) == len(ckpt.names("model.layers.1."))


def test_a_checked_checkpoint_is_read_without_parsing_a_header_again(tiny_ckpt, monkeypatch):
    """check_checkpoint (pre-flight) parses each shard's header once; a Checkpoint opened from its result sizes
    tensors and reads layers at the offsets it holds, with no header parsed again."""
    import inf_quant.read.checkpoint as checkpoint
    import inf_quant.read.load as load

    parsed, real = [], checkpoint.read_header

    def spy(path):
        parsed.append(path.name)
        return real(path)

    monkeypatch.setattr(checkpoint, "read_header", spy)
    monkeypatch.setattr(load, "read_header", spy)
    checked = checkpoint.check_checkpoint(tiny_ckpt)
    assert sorted(parsed) == sorted(set(checked.weight_map.values()))
    parsed.clear()
    ckpt = open_checkpoint(tiny_ckpt, checked=checked)
    assert sum(ckpt.info(n).nbytes for n in ckpt.weight_map) == sum(t.nbytes for t in checked.tensors.values())
    block = load_block(ckpt, skeleton(hf_config(ckpt)), 1, "cpu", torch.bfloat16)
    assert block.mlp.down_proj.weight.dtype == ckpt.dtype("model.layers.1.mlp.down_proj.weight")
    assert parsed == []
    open_checkpoint(tiny_ckpt)  # without pre-flight's result it checks the directory itself
    assert sorted(parsed) == sorted(set(checked.weight_map.values()))


def test_plain_reads_give_safe_opens_bytes(tmp_path):
    """read_safetensors (readinto at the header offsets) returns exactly what safetensors' own reader does, for
    every dtype and shape (0-d and empty included); a truncated shard is named, not read short."""
    from safetensors import safe_open

    from inf_quant.read.load import read_safetensors
    from inf_quant.save.write import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(7, 33, generator=g).bfloat16(), "f32": torch.randn(5, generator=g),
               "f16": torch.randn(3, 2, 2, generator=g).half(), "i32": torch.randint(-2**31, 2**31 - 1, (9, 4),
                                                                                    generator=g, dtype=torch.int32),
               "u8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    got = read_safetensors(path, list(tensors))
    with safe_open(str(path), framework="pt") as f:
        for k in tensors:
            want = f.get_tensor(k)
            assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
            assert torch.equal(got[k], want), k
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(path, list(tensors))


def test_layer_reader_reads_ahead_and_matches_load_block(tiny_ckpt, monkeypatch):
    """LayerReader gives load_block's modules; asking for layer i has started reading layer i + 1 (and no
    further); out of order is read on the spot; a failed read-ahead raises where its layer is asked for."""
    import inf_quant.read.load as load
    from inf_quant.read.load import LayerReader

    ckpt = open_checkpoint(tiny_ckpt)
    skel = skeleton(hf_config(ckpt))
    asked = _spy_reads(monkeypatch)
    with LayerReader(ckpt, skel, "cpu", torch.float32) as reader:
        for i in range(ckpt.num_layers):
            block = reader.block(i)
            want = load_block(ckpt, skel, i, "cpu", torch.float32)
            for k, v in want.state_dict().items():
                assert torch.equal(block.state_dict()[k], v), (i, k)
            if i + 1 < ckpt.num_layers:
                reader._ahead[1].result()
                layers = {int(n.split(".")[2]) for n in asked}
                assert layers <= {i, i + 1} and i + 1 in layers, (i, sorted(layers))
            asked.clear()
        block = reader.block(0)       # out of order
        assert torch.equal(block.self_attn.q_proj.weight, load_block(ckpt, skel, 0, "cpu", torch.float32)
                           .self_attn.q_proj.weight)

    real = load.read_safetensors

    def failing(path, keys, *header):
        if any(k.startswith("model.layers.1.") for k in keys):
            raise CheckpointError("layer 1 is unreadable")
        return real(path, keys, *header)

    monkeypatch.setattr(load, "read_safetensors", failing)
    with LayerReader(ckpt, skel, "cpu", torch.float32) as reader:
        reader.block(0)
        with pytest.raises(CheckpointError, match="layer 1 is unreadable"):
            reader.block(1)


def test_peak_memory_is_one_layer(tmp_path):
    """Iterating 8 layers of ~24 MB each (a ~200 MB checkpoint in many shards) never holds more than ~2 layers."""
    path = build_tiny_checkpoint(tmp_path / "wide", "inflm", vocab_size=512, max_shard_bytes=20_000_000,
                                 dtype=torch.float32, hidden_size=1024, intermediate_size=2048,
                                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
    ckpt = open_checkpoint(path)
    layer_bytes = sum(ckpt.info(n).nbytes for n in ckpt.names("model.layers.0."))
    total = sum(ckpt.info(n).nbytes for n in ckpt.weight_map)
    assert total > 7 * layer_bytes and len(ckpt.files) >= 8
    skel = skeleton(hf_config(ckpt))
    proc = psutil.Process()
    gc.collect()
    base, peak = proc.memory_info().rss, 0
    for i in range(ckpt.num_layers):
        block = load_block(ckpt, skel, i, "cpu", torch.float32)
        peak = max(peak, proc.memory_info().rss - base)
        del block
        gc.collect()
    assert peak < 2.5 * layer_bytes, f"peak RSS growth {peak / 2**20:.0f} MiB for {layer_bytes / 2**20:.0f} MiB layers"


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    model_dir = tmp_path / "pickled"
    src = build_tiny_checkpoint(tmp_path / "src", "llama")
    model_dir.mkdir()
    (model_dir / "config.json").write_text((src / "config.json").read_text())
    sd = {}
    for f in open_checkpoint(src).files:
        from safetensors.torch import load_file
        sd.update(load_file(src / f))
    torch.save(sd, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(model_dir)
    ckpt = open_checkpoint(model_dir, allow_pickle=True)
    block = load_block(ckpt, skeleton(hf_config(ckpt)), 0, "cpu", torch.bfloat16)
    assert torch.equal(block.self_attn.q_proj.weight, sd["model.layers.0.self_attn.q_proj.weight"])
    for name, w in sd.items():  # dtype and shape from the pickle itself (loaded on the meta device)
        assert ckpt.info(name).shape == tuple(w.shape) and ckpt.dtype(name) == w.dtype, name
        assert ckpt.info(name).nbytes == w.numel() * w.element_size(), name


def test_bad_checkpoints_give_clear_errors(tmp_path, inflm_ckpt):
    with pytest.raises(CheckpointError, match="not a directory"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        open_checkpoint(tmp_path / "empty")
    shard = open_checkpoint(inflm_ckpt).files[0]
    (inflm_ckpt / shard).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(inflm_ckpt)


def test_unsupported_model_type_is_named(tmp_path, inflm_ckpt):
    cfg = json.loads((inflm_ckpt / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (inflm_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'mamba' is not supported; supported: inflm, llama"):
        hf_config(open_checkpoint(inflm_ckpt))


def test_inf_remote_code_is_not_executed_by_default(tmp_path, inflm_ckpt):
    """INF's config carries an auto_map to 4.42-era files; our loader uses its own definition instead."""
    (inflm_ckpt / "modeling_inflm.py").write_text("raise RuntimeError('remote code executed')\n")
    ckpt = open_checkpoint(inflm_ckpt)
    assert type(hf_config(ckpt)).__name__ == "INFLMConfig"
    load_block(ckpt, skeleton(hf_config(ckpt)), 0, "cpu", torch.bfloat16)
