"""WordPiece text tokenizer over a local vocab.txt (paddlenlp's BertTokenizer; no hub download).

Chinese text is split one character per token, as ERNIE does; ASCII words are lower-cased and
split into WordPiece units; characters not in the vocab become [UNK]. Every text becomes

    [CLS] w_1 .. w_k [SEP] [PAD] .. [PAD]      (exactly `max_len` ids)

[CLS] doubles as begin-of-text and [SEP] as end-of-text for generation (see models/transformer.py).
paddlenlp takes ~4 s to import, so it is imported when the first tokenizer is built, not with
this module.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def is_cjk(char: str) -> bool:
    """CJK ideographs (the ranges BERT's BasicTokenizer splits one character per token)."""
    cp = ord(char)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_joined(char: str) -> bool:
    """Characters written without spaces around them (CJK and punctuation)."""
    return is_cjk(char) or unicodedata.category(char).startswith("P")


def pad_ids(encoded: Sequence[Sequence[int]], width: int, pad_id: int) -> np.ndarray:
    """Rows of ids -> int64 [B, width], right-padded with `pad_id`."""
    out = np.full((len(encoded), width), pad_id, dtype=np.int64)
    for row, ids in enumerate(encoded):
        out[row, : len(ids)] = ids
    return out


class TextTokenizer:
    """Text <-> ids with the [CLS] .. [SEP] [PAD].. convention."""

    def __init__(self, vocab_file: str | Path) -> None:
        from paddlenlp.transformers import BertTokenizer  # slow import: deferred

        path = Path(vocab_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: vocab file not found (build it with tools/build_vocab.py)")
        self.vocab_file = path
        self._tok = BertTokenizer(vocab_file=str(path), do_lower_case=True, tokenize_chinese_chars=True)
        vocab = self._tok.vocab
        missing = [t for t in SPECIAL_TOKENS if t not in vocab.token_to_idx]
        if missing:
            raise ValueError(f"{path}: vocab lacks special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            vocab.token_to_idx[t] for t in SPECIAL_TOKENS)
        self.vocab_size = len(vocab)
        self.special_ids = {self.pad_id, self.cls_id, self.sep_id, self.mask_id}

    def save_pretrained(self, folder: str | Path) -> None:
        """vocab.txt + tokenizer_config.json + special_tokens_map.json (paddlenlp's layout):
        paddlenlp.transformers.AutoTokenizer.from_pretrained(folder) rebuilds the same tokenizer."""
        from paddlenlp.utils.log import logger

        # paddlenlp logs one INFO line per file written; tools promise quiet output
        was_enabled = logger.is_enable  # a property
        logger.disable()
        try:
            self._tok.save_pretrained(str(folder))
        finally:
            if was_enabled:
                logger.enable()

    def tokenize(self, text: str) -> list[str]:
        return self._tok.tokenize(text)

    def encode(self, text: str, max_len: int) -> list[int]:
        """[CLS] + tokens (truncated) + [SEP], at most `max_len` ids, unpadded."""
        if max_len < 2:
            raise ValueError(f"max_len {max_len} leaves no room for [CLS] and [SEP]")
        ids = self._tok.convert_tokens_to_ids(self.tokenize(text))[: max_len - 2]
        return [self.cls_id, *ids, self.sep_id]

    def encode_batch(self, texts: Sequence[str], max_len: int, pad_to_longest: bool = False) -> np.ndarray:
        """int64 [B, max_len] (or [B, longest] with pad_to_longest), padded with [PAD]; the loss
        mask is `ids != pad_id`."""
        encoded = [self.encode(text, max_len) for text in texts]
        width = max(len(ids) for ids in encoded) if pad_to_longest else max_len
        return pad_ids(encoded, width, self.pad_id)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text: stops at [SEP], drops [CLS]/[PAD], joins CJK without spaces, merges ##pieces."""
        tokens: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.sep_id:
                break
            if i in self.special_ids:
                continue
            tokens.append(self._tok.vocab.idx_to_token[i])
        text = ""
        for tok in tokens:
            if tok.startswith("##"):
                text += tok[2:]
            elif not text or _is_joined(text[-1]) or _is_joined(tok[0]) or tok == "[UNK]":
                text += tok
            else:
                text += " " + tok
        return text
