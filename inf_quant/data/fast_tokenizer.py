"""INF's fast tokenizer: a `tokenizers` tokenizer.json with INFLMTokenizer's ids, converted from tokenizer.model.

INFLMTokenizer (models/tokenization_inflm.py) runs: added tokens split out verbatim -> the GPT-4 (cl100k) regex
split (tokenizers' `Split`, "isolated") -> SentencePiece BPE on each piece on its own -> no BOS/EOS. The fast
pipeline is the same steps in `tokenizers` terms:

    added tokens   the slow tokenizer's `added_tokens_decoder` (bos/eos/unk/pad, the chat tokens), unnormalized
    pre-tokenizer  Split(PATTERN, isolated), then Metaspace("▁", prepend never, no split): SentencePiece's
                   identity normalizer only escapes " " as "▁", per piece
    model          BPE over the piece ids; merges from the piece scores (SentencePiece merges the adjacent pair
                   whose result scores highest), byte fallback for characters outside the vocabulary
    decoder        "▁" -> " ", byte-fallback tokens -> bytes, fused
    post-processor none (no BOS/EOS), like INFLMTokenizer's default

Only the SentencePiece options INF's tokenizer uses are converted (BPE, identity normalizer, no dummy prefix,
whitespace kept, byte fallback); any other option is refused by name rather than approximated.

Known difference, decode only: a run of consecutive byte-fallback tokens whose bytes are not valid UTF-8 decodes
to one U+FFFD per byte token in `tokenizers` (even for the valid bytes in that run), while SentencePiece keeps the
valid characters and replaces only the invalid bytes. Ids obtained by encoding any text never contain such a run
(every character's bytes are complete), so encode -> decode round trips agree; only arbitrary (e.g. generated) id
sequences that end mid-character can decode differently. `tests/test_fast_tokenizer.py` pins this down.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..core.errors import CheckpointError
from ..models.tokenization_inflm import PATTERN

log = logging.getLogger(__name__)

FAST_TOKENIZER_FILE = "tokenizer.json"
SPIECE_UNDERLINE = "▁"
BPE, NORMAL, BYTE, UNUSED = 2, 1, 6, 5  # sentencepiece_model.proto: TrainerSpec.ModelType, SentencePiece.Type


def read_spm(path: Path):
    """The SentencePiece ModelProto of `path` (a tokenizer.model file)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({e})") from e
    return proto


def check_convertible(proto, where: Path) -> None:
    """Refuse SentencePiece options whose per-piece behaviour this conversion does not reproduce."""
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    wrong = []
    if ts.model_type != BPE:
        wrong.append(f"model_type={ts.model_type} (only BPE=2 is converted)")
    if ns.name not in ("identity", "") or ns.precompiled_charsmap:
        wrong.append(f"normalizer {ns.name!r} (only 'identity' is converted)")
    if ns.add_dummy_prefix:
        wrong.append("add_dummy_prefix=true")
    if ns.remove_extra_whitespaces:
        wrong.append("remove_extra_whitespaces=true")
    if not ns.escape_whitespaces or ts.treat_whitespace_as_suffix:
        wrong.append("whitespace not escaped as a '▁' prefix")
    if not ts.byte_fallback:
        wrong.append("byte_fallback=false")
    if any(p.type == UNUSED for p in proto.pieces):
        wrong.append("UNUSED pieces (SentencePiece re-segments them)")
    scores = [p.score for p in proto.pieces if p.type == NORMAL and len(p.piece) > 1]
    if len(set(scores)) != len(scores):
        wrong.append("tied merge scores (the merge order would be ambiguous)")
    if wrong:
        raise CheckpointError(f"{where}: cannot convert this SentencePiece model to an equivalent fast tokenizer: "
                              f"{'; '.join(wrong)}; serve it with the slow INFLMTokenizer (the inflm layout)")


def bpe_merges(proto) -> list[tuple[str, str]]:
    """Merges in priority order: every split of a NORMAL piece into two NORMAL pieces, highest piece score first.

    SentencePiece's BPE encoder repeatedly merges the adjacent symbol pair whose concatenation is a piece with the
    highest score; `tokenizers`' BPE applies the lowest-ranked merge first, so rank = order of decreasing score.
    Control, byte and user-defined pieces never result from (or take part in) a SentencePiece merge.
    """
    normal = {p.piece for p in proto.pieces if p.type == NORMAL}
    merges = []
    for _, i in sorted((-p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL and len(p.piece) > 1):
        s = proto.pieces[i].piece
        merges += [(s[:k], s[k:]) for k in range(1, len(s)) if s[:k] in normal and s[k:] in normal]
    return merges


def fast_tokenizer(slow):
    """A `tokenizers.Tokenizer` equivalent to the INFLMTokenizer `slow` (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    path = Path(slow.vocab_file)
    proto = read_spm(path)
    check_convertible(proto, path)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="never", split=False),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    added = sorted(slow.added_tokens_decoder.items())
    for i, t in added:
        if vocab.get(t.content) != i:
            raise CheckpointError(f"{path}: added token {t.content!r} has id {i} in tokenizer_config.json but "
                                  f"{vocab.get(t.content)} in tokenizer.model; the tokenizer files do not match")
    tok.add_special_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                       normalized=False, special=t.special) for _, t in added])
    return tok


def fast_tokenizer_json(slow) -> str:
    """tokenizer.json text for `slow`; the same bytes for the same tokenizer.model and added tokens."""
    return json.dumps(json.loads(fast_tokenizer(slow).to_str()), indent=2, ensure_ascii=False) + "\n"


def fast_tokenizer_config(slow_config: dict) -> dict:
    """tokenizer_config.json for loading tokenizer.json with `PreTrainedTokenizerFast` (no remote code).

    Everything INFLMTokenizer's config says about behaviour is kept (special tokens, no BOS/EOS, chat template,
    no clean-up of spaces, model_max_length); the slow class and its `auto_map` go.
    """
    cfg = {k: v for k, v in slow_config.items() if k not in ("auto_map", "tokenizer_class", "legacy",
                                                              "sp_model_kwargs", "spaces_between_special_tokens")}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.setdefault("add_bos_token", False)
    cfg.setdefault("add_eos_token", False)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    return cfg


def is_inflm_tokenizer(model_dir: Path) -> bool:
    cfg = model_dir / "tokenizer_config.json"
    return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class") == "INFLMTokenizer"


def write_fast_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Write tokenizer.json converted from src_dir's INFLMTokenizer into out_dir (replacing any copied one)."""
    from .tokenizer import load_tokenizer

    text = fast_tokenizer_json(load_tokenizer(src_dir))
    target = out_dir / FAST_TOKENIZER_FILE
    if target.is_file() and target.read_text(encoding="utf-8") != text:
        log.info("%s: replacing the input's tokenizer.json with one converted from tokenizer.model", target)
    tmp = out_dir / f".{FAST_TOKENIZER_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)  # never writes through a hard link (export links the input's files)


__all__ = ["fast_tokenizer", "fast_tokenizer_json", "fast_tokenizer_config", "write_fast_tokenizer",
           "is_inflm_tokenizer", "bpe_merges", "check_convertible"]
