"""INF-34B 4-bit g128 on one 24 GiB card under vLLM: the largest --max-model-len, fp16 vs fp8 KV, bf16 vs 4-bit lm_head.

Pure arithmetic from INF-34B's published shapes through `inf_quant.evaluate.fit_vllm` (the model behind
`inf-quant fit`); nothing is loaded. The 4-bit lm_head is GPTQ-packed like a block Linear ([V, D], g128, sym), the
embedding stays bf16. Run: `python bench/vllm_headline.py [--vram-gib 24]`; bench/RESULTS.md and README quote its
output.
"""

import argparse

from inf_quant.evaluate.fit_vllm import VllmSettings, fit_shapes, what_fits

D, I, L, V, HEADS, KV_HEADS, HEAD_DIM, G = 8192, 22016, 48, 96512, 64, 8, 128, 128
CONFIG = dict(model_type="inflm", hidden_size=D, intermediate_size=I, num_hidden_layers=L, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, vocab_size=V, max_position_embeddings=32768, tie_word_embeddings=False,
              quantization_config={"quant_method": "gptq", "bits": 4, "group_size": G})
LINEARS = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, D),
           "self_attn.v_proj": (KV_HEADS * HEAD_DIM, D), "self_attn.o_proj": (D, D), "mlp.gate_proj": (I, D),
           "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}


def gptq_bytes(n: int, k: int, bits: int = 4) -> int:
    """qweight [K*bits/32, N] int32 + qzeros [K/G, N*bits/32] int32 + scales [K/G, N] fp16 + g_idx [K] int32."""
    return n * k * bits // 8 + (k // G) * (n * bits // 32) * 4 + (k // G) * n * 2 + 4 * k


def sizes(lm_head_bits: int) -> dict[str, int]:
    out = {"model.embed_tokens.weight": V * D * 2, "model.norm.weight": D * 2, "model.norm.bias": D * 2,
           "lm_head": V * D * 2 if lm_head_bits == 16 else gptq_bytes(V, D, lm_head_bits)}
    for i in range(L):
        out.update({f"model.layers.{i}.{n}.{p}": D * 2 for n in ("input_layernorm", "post_attention_layernorm")
                    for p in ("weight", "bias")})
        out.update({f"model.layers.{i}.{name}": gptq_bytes(n, k) for name, (n, k) in LINEARS.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vram-gib", type=float, default=24.0)
    a = ap.parse_args()
    print("| lm_head | KV | weights GiB | vLLM defaults: --max-model-len | what makes 32768 fit |")
    print("|---|---|---:|---:|---|")
    for head in (16, 4):
        for kv in ("auto", "fp8"):
            s = sizes(head)
            r = fit_shapes(CONFIG, s, a.vram_gib, None, VllmSettings(kv_dtype=kv))
            best = what_fits(CONFIG, s, a.vram_gib, 32768, VllmSettings(kv_dtype=kv))
            how = " ".join(best.settings.flags()) if best.fits else f"does not fit (at most {best.max_model_len})"
            print(f"| {'bf16' if head == 16 else '4-bit g128'} | {'bf16' if kv == 'auto' else kv} | "
                  f"{r.weights_bytes / 2**30:.2f} | {r.max_model_len:,} | {how} |")


if __name__ == "__main__":
    main()
