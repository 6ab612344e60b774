"""The fast tokenizer (tokenizer.json) against INFLMTokenizer: same ids, same text, one pinned decode difference.

Cost measured on the busy 2-core CI machine: 32 s in all (the slow tokenizer over both bundled corpora ~6 s, the
subprocess determinism check ~10 s, the rest well under a second per test).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from transformers import PreTrainedTokenizerFast

from inf_quant.core.errors import CheckpointError
from inf_quant.core.paths import CALIBRATION, DEFAULT_MODEL, EVAL
from inf_quant.data.fast_tokenizer import (check_convertible, fast_tokenizer, fast_tokenizer_config,
                                           fast_tokenizer_json, read_spm, write_fast_tokenizer)
from inf_quant.data.tokenizer import load_tokenizer

ADVERSARIAL = [
    "", " ", "  ", "\n", "\t", "   \n\n  \t ", " " * 300, "\n" * 50, "\r\n\r\nwindows\r\nline endings\r",
    "1234567890" * 20, "3.14159 -42 +7e10 0x1F 1,000,000 ２０２６年", "x" * 1000, "....!!!???---___",
    "，。！？；：“”‘’（）【】《》、…—·「」『』〈〉", "你好，世界！这是一个测试。对酒当歌，人生几何",
    "😀😃🎉 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽", "e\u0301 café naïve Ångström ﬁ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 \U0010ffff",
    "    def f(x):\n        if x:\n\t\treturn  x ** 2  # square\n\n\n    pass\n", "```python\nprint('hi')\n```",
    "Привет мир مرحبا بالعالم こんにちは 안녕하세요 हिन्दी ไทย mixed中文English混合123数字",
    "<|start|>user<|message|>你好<|end|>", "text<|start|>mid<|end|>tail<|message|>", "<s></s><unk><pad>",
    "<|start|", "< |end|>", "<|START|>", "I'm we'LL they'D it'S O'Neill", "\u00a0nbsp\u2003emsp\u3000ideographic",
    "\x00\x01\x07\x7f", "\ufeffbom", "a\u200bb\u200dc\u2060d", "tab\tseparated\tvalues\t", "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def slow():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def fast(slow):
    return fast_tokenizer(slow)


def _records() -> list[str]:
    return [json.loads(line)["text"] for f in (CALIBRATION, EVAL) for line in f.read_text(encoding="utf-8").splitlines()]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_same_ids_and_text_on_every_bundled_record(slow, fast):
    texts = _records()
    assert len(texts) > 300
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    for i, (text, ids) in enumerate(zip(texts, got)):
        want = slow(text)["input_ids"]
        assert ids == want, f"record {i}: ids differ from token {_first_difference(ids, want)} on"
        assert fast.decode(ids, skip_special_tokens=False) == slow.decode(want) == text, f"record {i}"


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_same_ids_and_text_on_adversarial_input(slow, fast, text):
    want = slow(text)["input_ids"]
    ids = fast.encode(text, add_special_tokens=False).ids
    assert ids == want
    assert fast.decode(ids, skip_special_tokens=False) == slow.decode(want) == text
    assert fast.decode(ids, skip_special_tokens=True) == slow.decode(want, skip_special_tokens=True)


def _invalid_byte_run(slow, ids: list[int]) -> bool:
    """Does `ids` hold a run of consecutive byte-fallback tokens whose bytes are not valid UTF-8?"""
    run = []
    for tok in [*slow.convert_ids_to_tokens(ids), ""]:
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            run.append(int(tok[3:5], 16))
            continue
        try:
            bytes(run).decode("utf-8")
        except UnicodeDecodeError:
            return True
        run = []
    return False


def test_decode_differs_only_on_byte_runs_that_are_not_utf8(slow, fast):
    """The one known difference (see fast_tokenizer's docstring), pinned: never on any other id sequence."""
    assert slow.decode([43, 139]) == "$\ufffd" and fast.decode([43, 139]) == "\ufffd\ufffd"  # <0x24> <0x84>
    rnd, differing = random.Random(0), 0
    for _ in range(3000):
        ids = [rnd.randrange(len(slow)) for _ in range(rnd.randrange(1, 16))]
        for skip in (False, True):
            if fast.decode(ids, skip_special_tokens=skip) != slow.decode(ids, skip_special_tokens=skip):
                assert _invalid_byte_run(slow, ids), ids
                differing += 1
    assert differing > 0  # the sample does reach the case, so the check above is not vacuous


def test_transformers_loads_it_with_inf_behaviour(tmp_path, slow):
    """PreTrainedTokenizerFast over tokenizer.json + the converted config: no BOS, INF's specials, chat template."""
    cfg = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(fast_tokenizer_config(cfg)))
    write_fast_tokenizer(DEFAULT_MODEL, tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    text = "<|start|>user<|message|>你好 there<|end|>"
    assert tok(text)["input_ids"] == slow(text)["input_ids"] and tok(text)["input_ids"][0] == 4  # no BOS
    chat = [{"role": "user", "content": "hi"}]
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) ==
            slow.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == "user你好 there"


def test_tokenizer_json_is_the_same_bytes_in_another_process(slow):
    code = ("import hashlib\nfrom inf_quant.data.fast_tokenizer import fast_tokenizer_json\n"
            "from inf_quant.data.tokenizer import load_tokenizer\nfrom inf_quant.core.paths import DEFAULT_MODEL\n"
            "print(hashlib.sha256(fast_tokenizer_json(load_tokenizer(DEFAULT_MODEL)).encode()).hexdigest())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import hashlib

    assert r.stdout.split()[-1] == hashlib.sha256(fast_tokenizer_json(slow).encode()).hexdigest()


@pytest.mark.parametrize("change, message", [
    (lambda p: setattr(p.normalizer_spec, "add_dummy_prefix", True), "add_dummy_prefix=true"),
    (lambda p: setattr(p.normalizer_spec, "remove_extra_whitespaces", True), "remove_extra_whitespaces=true"),
    (lambda p: setattr(p.normalizer_spec, "name", "nmt_nfkc"), "normalizer 'nmt_nfkc'"),
    (lambda p: setattr(p.trainer_spec, "model_type", 1), "model_type=1 (only BPE=2"),
    (lambda p: setattr(p.trainer_spec, "byte_fallback", False), "byte_fallback=false"),
    (lambda p: setattr(p.pieces[5000], "score", p.pieces[5001].score), "tied merge scores"),
])
def test_unsupported_sentencepiece_options_are_refused_by_name(change, message):
    proto = read_spm(DEFAULT_MODEL / "tokenizer.model")
    check_convertible(proto, DEFAULT_MODEL)  # the bundled model converts
    change(proto)
    with pytest.raises(CheckpointError) as e:
        check_convertible(proto, DEFAULT_MODEL)
    assert message in str(e.value) and "inflm layout" in str(e.value)

