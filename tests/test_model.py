"""The inflm architecture: forward equals a hand-written reference; Auto classes and remote code load it."""

import math
import subprocess
import sys

import torch

import inf_quant  # noqa: F401  (registers inflm)
from tiny import tiny_model
from tolerances import MODEL_VS_REF_ATOL, assert_close


def reference_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """INF-34B by hand: LayerNorm(weight, bias) -> GQA attention with rope -> LayerNorm -> SwiGLU; untied head."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    hd, nh, nkv = c.hidden_size // c.num_attention_heads, c.num_attention_heads, c.num_key_value_heads
    T = ids.shape[1]

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + c.layer_norm_eps) * sd[p + ".weight"] + sd[p + ".bias"]

    inv = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # [T, hd/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # x: [heads, T, hd], rotate-half convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    h = sd["model.embed_tokens.weight"][ids[0]]
    mask = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        x = ln(h, p + "input_layernorm")
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        heads = []
        for j in range(nh):
            kv = j // (nh // nkv)  # GQA: query head j reads KV head j // group
            att = torch.softmax(q[j] @ k[kv].T / math.sqrt(hd) + mask, -1)
            heads.append(att @ v[kv])
        h = h + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
        x = ln(h, p + "post_attention_layernorm")
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return ln(h, "model.norm") @ sd["lm_head.weight"].T


def test_inflm_forward_matches_hand_written_reference():
    model = tiny_model("inflm", vocab_size=300, seed=3).float()
    ids = torch.randint(0, 300, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits[0].double()
    assert_close(got, reference_forward(model, ids), MODEL_VS_REF_ATOL, 0.0, "inflm logits vs reference")


def test_reference_catches_a_missing_layernorm_bias():
    """The comparison is sharp: zeroing one LayerNorm bias in the model moves logits far past tolerance."""
    model = tiny_model("inflm", vocab_size=300, seed=3).float()
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = reference_forward(model, ids)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.bias.zero_()
        got = model(ids).logits[0].double()
    assert (got - ref).abs().max() > 100 * MODEL_VS_REF_ATOL


def test_auto_classes_load_inflm(inflm_ckpt):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(inflm_ckpt).model_type == "inflm"
    model = AutoModelForCausalLM.from_pretrained(inflm_ckpt, dtype=torch.bfloat16)
    assert type(model).__name__ == "INFLMForCausalLM"
    assert isinstance(model.model.layers[0].input_layernorm, torch.nn.LayerNorm)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_plain_transformers_loads_with_remote_code_only(inflm_ckpt):
    """A process that never imports inf_quant loads the checkpoint through its auto_map files."""
    code = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(inflm_ckpt)!r}, trust_remote_code=True)\n"
        "assert 'inf_quant' not in sys.modules, 'inf_quant was imported'\n"
        "print(type(m).__name__, m(torch.tensor([[1, 2, 3]])).logits.shape[-1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["INFLMForCausalLM", "8192"]
