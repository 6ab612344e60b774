"""INF-34B's slow tokenizer (`INFLMTokenizer`), re-implemented for transformers 5.x.

Standalone (copied into every checkpoint inf-quant writes, with an `auto_map`). Behaviour matches INF's published
`tokenization_inflm.py`: the text is first split with a GPT-4 (cl100k) style regex (tokenizers' `Split`,
behaviour "isolated"), then each piece is encoded by the SentencePiece model on its own; ids are the
SentencePiece piece ids; decoding is SentencePiece's, with special tokens kept verbatim; no BOS/EOS is added
unless `add_bos_token` / `add_eos_token` is set.
"""

from tokenizers import Regex
from tokenizers.pre_tokenizers import Split
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

# INF's pattern, "same as gpt4 cl-base-100k" in their file.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+\s+(\S)+"
)


class INFLMTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        spaces_between_special_tokens=False,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.pre_split = Split(pattern=Regex(PATTERN), behavior="isolated", invert=False)
        kwargs.setdefault("legacy", True)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            spaces_between_special_tokens=spaces_between_special_tokens,
            **kwargs,
        )

    def _tokenize(self, text, **kwargs):
        pieces = [p for p, _ in self.pre_split.pre_tokenize_str(text)]
        if not pieces:
            return []
        return [tok for toks in self.sp_model.encode(pieces, out_type=str) for tok in toks]

    def convert_tokens_to_string(self, tokens):
        out, run = "", []
        specials = set(self.all_special_tokens)
        for tok in tokens:
            if tok in specials:
                out += self.sp_model.decode(run) + tok
                run = []
            else:
                run.append(tok)
        return out + self.sp_model.decode(run)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out = out + token_ids_1 + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + eos
        return mask


__all__ = ["INFLMTokenizer"]
