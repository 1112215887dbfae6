"""WordPiece tokenizer over a vocab built from manifests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ernie_vilg.text import SPECIAL_TOKENS, TextTokenizer, build_vocab


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    lines = [
        {"image": "a.png", "text": "一个红色的圆形", "texts": ["一个红色的圆形", "画面中间有一个圆形"]},
        {"image": "b.png", "text": "A Blue square, 在左边"},
    ]
    manifest = root / "m.jsonl"
    text = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n"
    manifest.write_text(text, encoding="utf-8")
    out = root / "vocab.txt"
    build_vocab([manifest], out)
    return out


def test_vocab_starts_with_special_tokens_and_has_one_char_per_chinese_token(vocab_file) -> None:
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    assert tuple(tokens[:5]) == SPECIAL_TOKENS
    assert len(tokens) == len(set(tokens))
    for ch in "一个红色的圆形画面中间有左边在":
        assert ch in tokens
    assert "红色" not in tokens  # Chinese is never a multi-character token
    assert "blue" in tokens and "square" in tokens and "##e" in tokens


def test_encode_pads_with_cls_sep_convention(vocab_file) -> None:
    tok = TextTokenizer(vocab_file)
    ids = tok.encode_batch(["一个红色的圆形", "blue"], max_len=10)
    assert ids.shape == (2, 10) and ids.dtype == np.int64
    assert ids[0, 0] == tok.cls_id and ids[0, 8] == tok.sep_id and ids[0, 9] == tok.pad_id
    assert tok.tokenize("blue") == ["blue"]
    assert ids[1, 0] == tok.cls_id and ids[1, 2] == tok.sep_id and (ids[1, 3:] == tok.pad_id).all()
    longest = tok.encode_batch(["一个红色的圆形", "blue"], max_len=10, pad_to_longest=True)
    assert longest.shape == (2, 9)
    assert tok.decode(ids[0]) == "一个红色的圆形"


def test_truncation_keeps_sep(vocab_file) -> None:
    tok = TextTokenizer(vocab_file)
    ids = tok.encode("一个红色的圆形一个红色的圆形", max_len=5)
    assert len(ids) == 5 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id


def test_unknown_characters_become_unk_and_ascii_is_lowercased(vocab_file) -> None:
    tok = TextTokenizer(vocab_file)
    assert tok.tokenize("猫") == ["[UNK]"]
    assert tok.tokenize("BLUE Square") == ["blue", "square"]
    # a word never seen whole is spelled with ##pieces
    assert tok.tokenize("bus") == ["b", "##u", "##s"]
    assert tok.decode(tok.encode("a blue square 在左边", 20)) == "a blue square在左边"


def test_missing_vocab_file_is_reported(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="build_vocab"):
        TextTokenizer(tmp_path / "nope.txt")
