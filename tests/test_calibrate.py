"""Calibration windows (document-aligned, without replacement, seeded) and calibration records (text and chat)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from inf_quant.core.errors import ConfigError
from inf_quant.data.calibrate import calibration_files, document_ids, sample_windows, window_starts

LOGGER = "inf_quant.data.calibrate"


def position_docs(lengths: list[int]) -> list[list[int]]:
    """Documents whose token ids are their positions in the concatenated stream, so a window shows its origin."""
    out, pos = [], 0
    for n in lengths:
        out.append(list(range(pos, pos + n)))
        pos += n
    return out


def doc_starts(lengths: list[int]) -> list[int]:
    return [sum(lengths[:i]) for i in range(len(lengths))]


def test_window_starts_on_a_worked_example():
    # docs [0,5) [5,8) [8,17) [17,19) [19,23), T=4: doc 0 continues once (4..8 packs doc 1 after it), doc 2 is
    # long (8, 12, then 16 packs doc 3 and the head of doc 4), the cut-off rest of doc 4 (20..22) stays unused
    assert window_starts([5, 3, 9, 2, 4], 4) == [0, 4, 8, 12, 16]
    # short documents are packed; a cut-off document's rest never opens a window
    assert window_starts([2, 2, 2, 2], 3) == [0, 4]


def test_windows_start_at_document_starts_and_use_no_token_twice():
    lengths = [int(n) for n in torch.randint(1, 90, (200,), generator=torch.Generator().manual_seed(1))]
    seqlen = 32
    n_windows = len(window_starts(lengths, seqlen))
    ids = sample_windows(position_docs(lengths), n_windows, seqlen, seed=0)
    assert ids.shape == (n_windows, seqlen) and ids.dtype == torch.int64
    assert (ids.diff(dim=1) == 1).all()  # each window is one contiguous run of the stream
    assert len(set(ids.flatten().tolist())) == ids.numel()  # no token position used twice
    starts, docs = set(ids[:, 0].tolist()), doc_starts(lengths)
    ends = docs[1:] + [sum(lengths)]
    for s in starts - set(docs):  # not a document start: must continue a window inside the same document
        d = max(i for i, a in enumerate(docs) if a <= s)
        assert s - seqlen in starts and s - seqlen >= docs[d] and s < ends[d], s
    assert len(starts & set(docs)) > n_windows // 2  # most windows open a document at this length mix


def test_warning_past_half_the_tokens_and_reuse_only_when_needed(caplog):
    docs = position_docs([10] * 10)  # 100 tokens: 10 windows of 8 (two per pair of documents)
    n_windows = len(window_starts([10] * 10, 8))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sample_windows(docs, 6, 8, seed=0)  # 48 of 100 tokens
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = sample_windows(docs, n_windows, 8, seed=0)  # 80 of 100 tokens: warned, still all distinct
    assert len(caplog.records) == 1 and "80" in caplog.text and "100" in caplog.text and "reused" not in caplog.text
    assert "\n" not in caplog.records[0].getMessage()
    assert len(set(ids[:, 0].tolist())) == n_windows
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = sample_windows(docs, n_windows + 3, 8, seed=0)
    assert len(caplog.records) == 1 and "3 windows are reused" in caplog.text
    counts = torch.unique(ids[:, 0], return_counts=True)[1]
    assert len(counts) == n_windows and counts.max() == 2 and counts.sum() == n_windows + 3


def test_deterministic_in_the_seed_and_different_across_seeds():
    docs = position_docs([12] * 300)
    a, b, c = (sample_windows(docs, 16, 8, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and set(a[:, 0].tolist()) != set(c[:, 0].tolist())


def test_too_little_text_for_one_window():
    with pytest.raises(ConfigError, match="fewer than one window of seqlen=64"):
        sample_windows(position_docs([10, 20]), 1, 64, seed=0)


# ---- records: plain text and chat ----

def tiny_chat_tokenizer(template: str | None = "{{ bos_token }}{% for m in messages %}<|im_start|> {{ m['role'] }} "
                                                "{{ m['content'] }} <|im_end|> {% endfor %}"):
    """A word-level fast tokenizer that adds BOS by default, with a template that writes BOS itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "there", "hello"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = template
    return tok


CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]


def write_jsonl(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")


def template_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_records_get_the_templates_ids_once_with_special_tokens(tmp_path):
    tok = tiny_chat_tokenizer()
    f = tmp_path / "c.jsonl"
    write_jsonl(f, [{"messages": CHAT}, {"text": "hello there"}])
    chat, text = document_ids(tok, (f,))
    assert chat == template_ids(tok, CHAT) + [tok.eos_token_id]
    assert chat.count(tok.bos_token_id) == 1  # tokenizing the rendered string *with* special tokens doubles BOS
    assert tok(tok.apply_chat_template(CHAT, tokenize=False))["input_ids"].count(tok.bos_token_id) == 2
    assert text == tok("hello there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_chat_records_with_the_bundled_models_inf_template(tmp_path):
    from inf_quant.core.paths import DEFAULT_MODEL
    from inf_quant.data.tokenizer import load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    msgs = [{"role": "user", "content": "什么是行？"}, {"role": "assistant", "content": "设置行高。\n\nRows."}]
    f = tmp_path / "c.jsonl"
    write_jsonl(f, ["", {"text": "plain"}, {"messages": msgs}])
    plain, chat = document_ids(tok, (f,))
    assert chat == template_ids(tok, msgs) + [tok.eos_token_id]
    assert chat[0] == tok.convert_tokens_to_ids("<|start|>") and tok.convert_tokens_to_ids("<|end|>") in chat


@pytest.mark.parametrize("line, message", [
    ({"txt": "x"}, "c.jsonl:2: each line needs exactly one of 'text' (a string) or 'messages'"),
    ({"text": "x", "messages": CHAT}, "c.jsonl:2: each line needs exactly one of 'text'"),
    ({"text": 3}, "c.jsonl:2: 'text' must be a string"),
    ({"messages": []}, "c.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "c.jsonl:2: 'messages' must be a non-empty list"),
    ("[1, 2]", "c.jsonl:2: each line must be a JSON object"),
    ("{oops", "c.jsonl:2: not valid JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "c.jsonl"
    write_jsonl(f, [{"text": "fine"}, line])
    with pytest.raises(ConfigError) as e:
        document_ids(tiny_chat_tokenizer(), (f,))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_chat_record_without_a_chat_template(tmp_path):
    f = tmp_path / "c.jsonl"
    write_jsonl(f, [{"text": "fine"}, {"messages": CHAT}])
    with pytest.raises(ConfigError) as e:
        document_ids(tiny_chat_tokenizer(template=None), (f,))
    assert "c.jsonl:2: a chat record" in str(e.value) and "no chat template" in str(e.value)
    assert "\n" not in str(e.value)


def test_calibration_sources(tmp_path):
    from inf_quant.core.paths import CALIBRATION
    from inf_quant.data.calibrate import CHAT as CHAT_FILE

    assert calibration_files("bundled") == (CALIBRATION,)
    assert calibration_files("bundled-chat") == (CHAT_FILE,)
    assert calibration_files("bundled-mix") == (CALIBRATION, CHAT_FILE)
    f = tmp_path / "mine.jsonl"
    f.write_text('{"text": "x"}\n')
    assert calibration_files(str(f)) == (f,)
    with pytest.raises(ConfigError, match="no such file; use one of bundled, bundled-chat, bundled-mix"):
        calibration_files("bundled-typo")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ConfigError, match="expected a .jsonl"):
        calibration_files(str(tmp_path / "x.csv"))


class CharTokenizer:
    """One token per character (its code point), EOS 0: enough for token_stream."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens, verbose):
        return {"input_ids": [ord(c) for c in text]}


def test_verify_domain_windows_never_mix_domains_and_refuse_a_short_domain():
    from inf_quant.verify import domain_windows

    records = [{"lang": "en", "text": "abcdefg"}, {"lang": "code", "text": "xyz"}, {"lang": "en", "text": "hij"}]
    windows, doms = domain_windows(CharTokenizer(), records, 4, 0)
    # code: "xyz" EOS -> 1 window; en: "abcdefg" EOS "hij" EOS (12 tokens) -> 3 windows; domains in sorted order
    assert doms == ["code", "en", "en", "en"]
    assert windows.tolist() == [[120, 121, 122, 0], [97, 98, 99, 100], [101, 102, 103, 0], [104, 105, 106, 0]]
    with pytest.raises(ConfigError, match=r"eval domain 'code' has 4 tokens, fewer than --seqlen 5"):
        domain_windows(CharTokenizer(), records, 5, 0)
