"""INFLMTokenizer: INF's pre-split + per-piece SentencePiece behaviour, lossless round trips, one load path."""

import json
import subprocess
import sys

import sentencepiece as spm
from tokenizers import Regex
from tokenizers.pre_tokenizers import Split

from inf_quant.core.paths import DEFAULT_MODEL
from inf_quant.data.tokenizer import load_tokenizer
from inf_quant.models.tokenization_inflm import PATTERN, INFLMTokenizer

SAMPLES = [
    "Hello world, it's 2026!  Two  spaces\tand a tab.\n\nNew paragraph.",
    "对酒当歌，人生几何！譬如朝露，去日苦多。",
    "def f(x):\n    return x ** 2  # square\n",
    "Solve 12345 + 678 = ? The answer is 13023.",
    "<|start|>user<|message|>你好<|end|>",
]


def reference_ids(text: str) -> list[int]:
    """INF's published algorithm written out: regex split (isolated), then sp.encode per piece."""
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_MODEL / "tokenizer.model"))
    pre = Split(pattern=Regex(PATTERN), behavior="isolated")
    return [sp.piece_to_id(p) for piece, _ in pre.pre_tokenize_str(text) for p in sp.encode(piece, out_type=str)]


def test_ids_follow_inf_algorithm_and_round_trip():
    tok = load_tokenizer(DEFAULT_MODEL)
    assert isinstance(tok, INFLMTokenizer)
    for text in SAMPLES[:4]:
        ids = tok(text)["input_ids"]
        assert ids == reference_ids(text), text
        assert tok.decode(ids) == text


def test_special_tokens_and_no_bos():
    tok = load_tokenizer(DEFAULT_MODEL)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    ids = tok(SAMPLES[4])["input_ids"]
    start, end, msg = (tok.convert_tokens_to_ids(t) for t in ("<|start|>", "<|end|>", "<|message|>"))
    assert ids[0] == start and ids[-1] == end and msg in ids
    assert ids[0] != tok.bos_token_id  # no BOS is added by default, like INF's
    assert tok.decode(ids) == SAMPLES[4]
    assert tok.decode(ids, skip_special_tokens=True) == "user你好"


def test_chat_template_matches_inf_format():
    tok = load_tokenizer(DEFAULT_MODEL)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|start|>user<|message|>hi<|end|>\n<|start|>assistant<|message|>"


def test_remote_code_copy_gives_same_ids(tmp_path):
    """Plain transformers with trust_remote_code (no inf_quant import) tokenizes identically."""
    code = (
        "import sys, json, transformers\n"
        f"t = transformers.AutoTokenizer.from_pretrained({str(DEFAULT_MODEL)!r}, trust_remote_code=True)\n"
        "assert 'inf_quant' not in sys.modules\n"
        f"print(json.dumps([t(s)['input_ids'] for s in {SAMPLES!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load_tokenizer(DEFAULT_MODEL)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [tok(s)["input_ids"] for s in SAMPLES]
