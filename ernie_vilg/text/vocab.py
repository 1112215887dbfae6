"""Build a WordPiece vocab.txt from manifests: special tokens first, then one token per Chinese
character, lower-cased ASCII words, and single-character pieces (`x`, `##x`) so every ASCII word
the builder saw can still be spelled when a whole-word entry is missing."""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ernie_vilg.text.tokenizer import SPECIAL_TOKENS, is_cjk


def _texts(manifests: Iterable[str | Path]) -> Iterable[str]:
    from ernie_vilg.data.manifest import iter_manifest

    for manifest in manifests:
        for record in iter_manifest(manifest):
            yield record.text
            yield from record.texts


def build_vocab(manifests: Sequence[str | Path], out: str | Path, min_count: int = 1) -> list[str]:
    """Write vocab.txt (one token per line) and return its tokens."""
    from paddlenlp.transformers.bert.tokenizer import BasicTokenizer  # slow import: deferred

    basic = BasicTokenizer(do_lower_case=True, tokenize_chinese_chars=True)
    words: Counter[str] = Counter()
    pieces: set[str] = set()
    for text in _texts(manifests):
        for word in basic.tokenize(text):
            words[word] += 1
            if len(word) > 1 or not is_cjk(word):
                pieces.update(word)
                pieces.update("##" + ch for ch in word)
    if not words:
        from ernie_vilg.data.manifest import ManifestError

        # an empty vocab (only the special tokens) would train a model that can say nothing
        raise ManifestError(", ".join(str(m) for m in manifests), "no text to build a vocab from "
                            "(empty manifest or no usable line)")
    kept = sorted(w for w, c in words.items() if c >= min_count)
    tokens = list(SPECIAL_TOKENS)
    seen = set(tokens)
    for tok in kept + sorted(pieces):
        if tok not in seen:
            tokens.append(tok)
            seen.add(tok)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens


def build_vqa_vocab(manifests: Sequence[str | Path], out: str | Path) -> list[str]:
    """WordPiece vocab over the questions and answers of VQA manifests (tools/build_vocab.py reads
    only `text` / `texts`, i.e. the answers)."""
    from ernie_vilg.data.manifest import iter_manifest

    with tempfile.TemporaryDirectory() as tmp:
        qa = Path(tmp) / "qa.jsonl"
        with qa.open("w", encoding="utf-8") as fh:
            for manifest in manifests:
                for rec in iter_manifest(Path(manifest)):
                    texts = [str(rec.extra.get("question", "")), rec.text, *rec.texts]
                    fh.write(json.dumps({"image": "x.png", "text": texts[0] or rec.text, "texts": texts},
                                        ensure_ascii=False) + "\n")
        return build_vocab([qa], out)
