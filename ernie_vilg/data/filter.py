"""The paper's data filter (ERNIE-ViLG sec. 3.2.1), applied to a manifest line by line.

A pair is kept when its `text` passes every rule below, checked in this order; a rejected line
carries `reject_reason` naming the FIRST rule it failed, as one of these exact strings:

    bad_line(<why>)            the line is not UTF-8 / not JSON / not an object / has no text
    too_many_words(N>=15)      rule 1: the text must have fewer than `max_words` (15) words
    no_noun                    rule 2: the text must contain at least one noun
    special_char(U+XXXX)       rule 3: the first character outside the allowed set (below)
    bad_image(<why>)           rule 4 only: the image cannot be read for scoring
    low_similarity(S<=T)       rule 4: reranker similarity S (floored to 2 decimals) <= threshold T

Definitions (stated in full in docs/data.md):

- Words (rule 1): jieba.posseg segmentation (default HMM on) of the text; a token is a word when
  it holds at least one letter or digit (Unicode category L* or N*). Tokens of only whitespace,
  punctuation or symbols are not words, so "一只猫。" has 2 words (一只, 猫). English words are
  words (jieba splits them at spaces).
- Nouns (rule 2): a token whose jieba POS tag starts with "n": n, ng, nr, nrfg, nrt, ns, nt, nz
  (noun, noun morpheme, person, place, organisation, other proper noun). Verbal / adjectival
  nouns (vn, an) are not counted; jieba tags English words "eng", so an all-English text has no
  noun under this rule (the paper's corpus is Chinese).
- Allowed characters (rule 3): CJK unified ideographs U+4E00-U+9FFF and extension A
  U+3400-U+4DBF; ASCII letters and digits; the space U+0020 and the ideographic space U+3000;
  the ASCII punctuation , . ! ? : ; ' " ( ) - / % ; the Chinese punctuation
  ，。、！？：；“”‘’（）《》…—·. Everything else is special: emoji, control characters
  (tab, newline), # @ $ & * + = _ ^ ~ ` | < > { } [ ] \\, ¥, 【】, full-width letters, private-use
  characters, accented Latin letters, kana, hangul.
- Similarity (rule 4, optional): `Reranker.score` in [0, 1] (see models/reranker.py; `models.reranker.reranker_scorer` is that Scorer); kept when
  score > threshold (default 0.5, as in the paper).

Output: kept lines go out as they came (only a relative `image` path is rewritten so that it
still resolves from the output manifest's folder); rejected lines are the input object plus
`reject_reason` (a line that is not a JSON object is wrapped as {"line": raw, "line_no": n}).
"""
from __future__ import annotations

import json
import logging
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ernie_vilg.data.manifest import BOM, ManifestError, decode_json_line, has_visible_text

log = logging.getLogger(__name__)

MAX_WORDS = 15
SIMILARITY_THRESHOLD = 0.5
NOUN_TAGS = ("n", "ng", "nr", "nrfg", "nrt", "ns", "nt", "nz")  # documented list; the test is tag[0] == "n"
ASCII_PUNCT = ",.!?:;'\"()-/%"
CHINESE_PUNCT = "，。、！？：；“”‘’（）《》…—·"
_ALLOWED_EXTRA = frozenset(ASCII_PUNCT + CHINESE_PUNCT + " \u3000")

_jieba_ready = False


def _posseg():
    """jieba.posseg, imported once with its chatty logging silenced."""
    global _jieba_ready
    import jieba
    import jieba.posseg as pseg

    if not _jieba_ready:
        jieba.setLogLevel(logging.WARNING)
        _jieba_ready = True
    return pseg


def is_allowed_char(ch: str) -> bool:
    cp = ord(ch)
    if 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF:
        return True
    if ch.isascii() and ch.isalnum():
        return True
    return ch in _ALLOWED_EXTRA


def first_special_char(text: str) -> Optional[str]:
    """The first character outside the allowed set, or None."""
    for ch in text:
        if not is_allowed_char(ch):
            return ch
    return None


def _is_word(token: str) -> bool:
    return any(unicodedata.category(c)[0] in "LN" for c in token)


def segment(text: str) -> list[tuple[str, str]]:
    """(token, POS tag) pairs from jieba.posseg; the one segmentation rules 1 and 2 share."""
    return [(p.word, p.flag) for p in _posseg().cut(text)]


def count_words(text: str) -> int:
    return sum(1 for tok, _ in segment(text) if _is_word(tok))


def has_noun(text: str) -> bool:
    return any(flag.startswith("n") for _, flag in segment(text))


def _floor2(x: float) -> str:
    # floor (not round) so the printed inequality stays true: 0.4999 prints as 0.49, never 0.50
    return f"{math.floor(x * 100) / 100:.2f}"


def text_reject_reason(text: str, max_words: int = MAX_WORDS) -> Optional[str]:
    """Rules 1-3 on one text: None when it passes, else the exact reason of the first failure."""
    tokens = segment(text)
    words = sum(1 for tok, _ in tokens if _is_word(tok))
    if words >= max_words:
        return f"too_many_words({words}>={max_words})"
    if not any(flag.startswith("n") for _, flag in tokens):
        return "no_noun"
    ch = first_special_char(text)
    if ch is not None:
        return f"special_char(U+{ord(ch):04X})"
    return None


def similarity_reject_reason(score: float, threshold: float = SIMILARITY_THRESHOLD) -> Optional[str]:
    if score > threshold:
        return None
    return f"low_similarity({_floor2(score)}<={threshold:g})"


# ------------------------------------------------------------------------------ streaming

@dataclass
class FilterSummary:
    read: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # reason kind -> count

    @property
    def rejected(self) -> int:
        return self.read - self.kept

    def count(self, reason: Optional[str]) -> None:
        self.read += 1
        if reason is None:
            self.kept += 1
        else:
            kind = reason.split("(")[0]
            self.reasons[kind] = self.reasons.get(kind, 0) + 1

    def table(self) -> str:
        """A plain-text table: one row per outcome, with counts and shares."""
        rows = [("kept", self.kept)] + sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        width = max(len(r[0]) for r in rows + [("rejected", 0)])
        total = max(self.read, 1)
        lines = [f"{'outcome':<{width}}  {'lines':>9}  {'share':>7}"]
        for name, n in rows:
            lines.append(f"{name:<{width}}  {n:>9}  {100 * n / total:>6.2f}%")
        lines.append(f"{'total':<{width}}  {self.read:>9}  {100.0 if self.read else 0.0:>6.2f}%")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "rejected": self.rejected, "reasons": dict(self.reasons)}


@dataclass
class _Line:
    line_no: int
    obj: Optional[dict[str, Any]]
    raw: str
    reason: Optional[str] = None


def _parse(raw: bytes, line_no: int) -> _Line:
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    text = raw.decode("utf-8", "replace")
    try:
        obj = decode_json_line(raw, f"line {line_no}")
    except ManifestError as exc:
        # the same short reasons as before ("not JSON", "not UTF-8"): they are counted by name
        reason = "not UTF-8" if exc.reason.startswith("not UTF-8") else "not JSON"
        return _Line(line_no, None, text, f"bad_line({reason})")
    if not isinstance(obj, dict):
        return _Line(line_no, None, text, "bad_line(not a JSON object)")
    if not isinstance(obj.get("text"), str) or not has_visible_text(obj["text"]):
        return _Line(line_no, obj, text, "bad_line(no text)")
    return _Line(line_no, obj, text)


def _rebase_image(obj: dict[str, Any], src_dir: Path, dst_dir: Path) -> dict[str, Any]:
    """Rewrite a relative `image` path so it resolves from `dst_dir` as it did from `src_dir`."""
    image = obj.get("image")
    if not isinstance(image, str) or not image or os.path.isabs(image) or src_dir == dst_dir:
        return obj
    return {**obj, "image": os.path.relpath(src_dir / image, dst_dir)}


# Scorer: (image paths, texts) -> one similarity in [0, 1] per pair, or an exception message
Scorer = Callable[[Sequence[str], Sequence[str]], Sequence[Any]]


def filter_manifest(
    manifest: str | Path,
    kept_out: str | Path,
    rejected_out: str | Path,
    max_words: int = MAX_WORDS,
    scorer: Optional[Scorer] = None,
    threshold: float = SIMILARITY_THRESHOLD,
    chunk_size: int = 256,
    progress: bool = False,
) -> FilterSummary:
    """Stream `manifest` in chunks of `chunk_size` lines (never the whole file in memory) and
    write the kept and rejected manifests, in input order. Blank lines are ignored."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: manifest file not found")
    kept_out, rejected_out = Path(kept_out), Path(rejected_out)
    for p in (kept_out, rejected_out):
        p.parent.mkdir(parents=True, exist_ok=True)
    src_dir = manifest.resolve().parent
    kept_dir, rej_dir = kept_out.resolve().parent, rejected_out.resolve().parent
    summary = FilterSummary()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"filter {manifest.name}", unit="line")

    def chunks() -> Iterator[list[_Line]]:
        chunk: list[_Line] = []
        with manifest.open("rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    continue
                chunk.append(_parse(raw, line_no))
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    kept_tmp = kept_out.with_name(kept_out.name + ".tmp")
    rej_tmp = rejected_out.with_name(rejected_out.name + ".tmp")
    with kept_tmp.open("w", encoding="utf-8") as kf, rej_tmp.open("w", encoding="utf-8") as rf:
        for chunk in chunks():
            for line in chunk:
                if line.reason is None:
                    line.reason = text_reject_reason(line.obj["text"], max_words)
            if scorer is not None:
                todo = [l for l in chunk if l.reason is None]
                if todo:
                    paths = []
                    for l in todo:
                        image = l.obj.get("image")
                        paths.append(str(src_dir / image) if isinstance(image, str) and image else "")
                    scores = scorer(paths, [l.obj["text"] for l in todo])
                    for l, s in zip(todo, scores):
                        if isinstance(s, Exception):
                            l.reason = f"bad_image({type(s).__name__})"
                        else:
                            l.reason = similarity_reject_reason(float(s), threshold)
            for line in chunk:
                summary.count(line.reason)
                if line.reason is None:
                    kf.write(json.dumps(_rebase_image(line.obj, src_dir, kept_dir), ensure_ascii=False) + "\n")
                else:
                    obj = (_rebase_image(line.obj, src_dir, rej_dir) if line.obj is not None
                           else {"line": line.raw, "line_no": line.line_no})
                    rf.write(json.dumps({**obj, "reject_reason": line.reason}, ensure_ascii=False) + "\n")
            if bar is not None:
                bar.update(len(chunk))
    kept_tmp.replace(kept_out)
    rej_tmp.replace(rejected_out)
    if bar is not None:
        bar.close()
    return summary
