"""Train the bundled default model `models/inf-tiny` from the bundled calibration corpus (deterministic on CPU).

    python scripts/train_default_model.py [--steps 600] [--out models/inf-tiny]

1. trains a SentencePiece BPE model (8192 pieces, byte fallback, INF's special ids: unk 0, bos 1, eos 2, pad 3,
   chat tokens <|start|> <|end|> <|message|>) on the calibration text, pre-split with INF's regex, so the tiny model
   goes through exactly the INFLMTokenizer path that INF-34B uses;
2. trains a small INF-architecture LM (LayerNorm with bias, GQA 8:2, rope theta 500000, untied head) on the
   calibration tokens; the held-out eval/ set is never seen;
3. saves it like INF-34B: bf16 safetensors in several shards + index, config.json with auto_map, tokenizer files,
   generation_config.json, modeling files, and TRAINING.json with eval perplexity vs a unigram baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Regex
from tokenizers.pre_tokenizers import Split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inf_quant.core import paths  # noqa: E402
from inf_quant.data.calibrate import eval_windows  # noqa: E402
from inf_quant.models.configuration_inflm import INFLMConfig  # noqa: E402
from inf_quant.models.modeling_inflm import INFLMForCausalLM  # noqa: E402
from inf_quant.models.tokenization_inflm import PATTERN, INFLMTokenizer  # noqa: E402
from inf_quant.save.write import (INFLM_AUTO_MAP, INFLM_TOKENIZER_AUTO_MAP, copy_modeling_files,  # noqa: E402
                                  save_sharded, write_json)

CHAT_TOKENS = ["<|start|>", "<|end|>", "<|message|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|message|>{% endif %}"
)
ARCH = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, layer_norm_eps=1e-5)


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer(texts: list[str], out: Path, vocab: int) -> None:
    pre = Split(pattern=Regex(PATTERN), behavior="isolated")  # train on INF's pre-split pieces
    pieces = [p for t in texts for p, _ in pre.pre_tokenize_str(t)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(pieces), model_prefix=str(out / "tokenizer"), vocab_size=vocab, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=CHAT_TOKENS, num_threads=1,
        max_sentence_length=1 << 16, minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False,
    )
    (out / "tokenizer.vocab").unlink()
    added = {str(i + 4): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": True} for i, t in enumerate(CHAT_TOKENS)}
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "INFLMTokenizer",
        "auto_map": dict(INFLM_TOKENIZER_AUTO_MAP),
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added, "extra_special_tokens": CHAT_TOKENS, "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
    })


def batches(ids: torch.Tensor, seqlen: int, batch: int, steps: int, seed: int):
    rng = random.Random(seed)
    n = (len(ids) - 1) // seqlen
    order: list[int] = []
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            if not order:
                order = list(range(n))
                rng.shuffle(order)
            rows.append(order.pop())
        yield torch.stack([ids[r * seqlen: r * seqlen + seqlen + 1] for r in rows])


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean NLL) over windows [S, T] (every token but each window's first is predicted)."""
    model.eval()
    nll, n = 0.0, 0
    for x in windows.split(8):
        logits = model(x[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    return math.exp(nll / n)


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[test].mean().item())


def evaluate(model, tok, train_ids: torch.Tensor, evals: list[str], seqlen: int) -> tuple[float, float]:
    """Eval perplexity on non-overlapping (seqlen+1)-token windows of eval/ (the tail dropped), and the add-one
    unigram baseline fitted on the training tokens, scored on the same predicted tokens."""
    windows = eval_windows(tok, evals, seqlen + 1)
    ppl = perplexity(model, windows)
    uni = unigram_perplexity(train_ids, windows[:, 1:].flatten(), tok.vocab_size)
    print(f"eval perplexity {ppl:.2f} (bf16 weights) vs unigram baseline {uni:.2f}", flush=True)
    return ppl, uni


def eval_only(args) -> None:
    """Recompute TRAINING.json's perplexities for the saved model (e.g. after changing the evaluation)."""
    from transformers import AutoModelForCausalLM

    import inf_quant  # noqa: F401

    tok = INFLMTokenizer(vocab_file=str(args.out / "tokenizer.model"))
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    train_ids = torch.tensor([i for t in read_texts(paths.CALIBRATION) for i in tok(t)["input_ids"] + [2]])
    ppl, uni = evaluate(model, tok, train_ids, read_texts(paths.EVAL), args.seqlen)
    record = json.loads((args.out / "TRAINING.json").read_text())
    record.update(eval_perplexity_bf16=round(ppl, 3), eval_unigram_perplexity=round(uni, 3))
    write_json(args.out / "TRAINING.json", record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=paths.DEFAULT_MODEL)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mib", type=float, default=8.0)
    ap.add_argument("--eval-only", action="store_true", help="only recompute TRAINING.json's perplexities")
    args = ap.parse_args()
    if args.eval_only:
        return eval_only(args)

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    calib, evals = read_texts(paths.CALIBRATION), read_texts(paths.EVAL)
    train_tokenizer(calib, args.out, args.vocab)
    copy_modeling_files(args.out)
    tok = INFLMTokenizer(vocab_file=str(args.out / "tokenizer.model"))
    eos = tok.eos_token_id
    enc = lambda texts: torch.tensor([i for t in texts for i in tok(t)["input_ids"] + [eos]])  # noqa: E731
    train_ids, eval_ids = enc(calib), enc(evals)
    print(f"tokens: train {len(train_ids)}, eval {len(eval_ids)}", flush=True)

    config = INFLMConfig(vocab_size=tok.vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False, **ARCH)
    model = INFLMForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    t0 = time.time()
    model.train()
    for step, x in enumerate(batches(train_ids, args.seqlen, args.batch, args.steps, args.seed)):
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)

    model = model.to(torch.bfloat16).float()  # the shipped bf16 weights, evaluated with fp32 arithmetic
    ppl, uni = evaluate(model, tok, train_ids, evals, args.seqlen)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_sharded(tensors, args.out, int(args.shard_mib * 2**20))
    cfg = config.to_dict()
    cfg.update(architectures=["INFLMForCausalLM"], dtype="bfloat16", auto_map=dict(INFLM_AUTO_MAP))
    cfg.pop("transformers_version", None)
    write_json(args.out / "config.json", cfg)
    write_json(args.out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
                                                     "do_sample": False, "max_new_tokens": 64})
    write_json(args.out / "TRAINING.json", {
        "script": "scripts/train_default_model.py", "args": {k: str(v) if isinstance(v, Path) else v
                                                             for k, v in vars(args).items() if k != "out"},
        "train_tokens": len(train_ids), "eval_tokens": len(eval_ids), "eval_perplexity_bf16": round(ppl, 3),
        "eval_unigram_perplexity": round(uni, 3), "parameters": sum(t.numel() for t in tensors.values()),
        "torch": torch.__version__})


if __name__ == "__main__":
    main()
