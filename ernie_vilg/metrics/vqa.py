"""Automatic scores for generated (free-form) VQA answers, e.g. on FM-IQA.

The paper evaluates FM-IQA only by humans (Turing test + 0-2 quality score, Table 6); these
scores are the automatic proxy: exact match and character-level F1 after the same
normalisation as the character-level caption metrics (no whitespace, no punctuation,
lower-case). With several reference answers the best one counts.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from ernie_vilg.metrics.caption import CaptionDataError, char_tokens, check_ids, iter_json_lines


def normalize_answer(text: str) -> str:
    return "".join(char_tokens(text))


def exact_match(pred: str, refs: Sequence[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(r) for r in refs))


def char_f1(pred: str, refs: Sequence[str]) -> float:
    """Best F1 over references of the character multisets (SQuAD-style F1 on characters)."""
    p = Counter(char_tokens(pred))
    best = 0.0
    for ref in refs:
        r = Counter(char_tokens(ref))
        common = sum((p & r).values())
        if common:
            precision, recall = common / sum(p.values()), common / sum(r.values())
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def score_vqa(preds: Mapping[Any, str], refs: Mapping[Any, Sequence[str] | str],
              pred_name: str = "predictions", ref_name: str = "references") -> dict[str, Any]:
    """``exact_match`` and ``char_f1`` (0-100, averaged over questions) and ``count``.

    An answer that is empty after normalisation scores 0; references must not be empty.
    """
    preds = {str(k): v for k, v in preds.items()}
    refs = {str(k): [v] if isinstance(v, str) else list(v) for k, v in refs.items()}
    check_ids(preds, refs, pred_name, ref_name)
    if not refs:
        raise CaptionDataError("nothing to score: no ids")
    for k, rs in refs.items():
        if not rs or not all(normalize_answer(r) for r in rs):
            raise CaptionDataError(f"{ref_name}: id {k!r} has an empty reference answer")
    em = sum(exact_match(preds[k], refs[k]) for k in refs)
    f1 = sum(char_f1(preds[k], refs[k]) for k in refs)
    n = len(refs)
    return {"exact_match": 100.0 * em / n, "char_f1": 100.0 * f1 / n, "count": n}


def read_answers(path: str | Path) -> dict[str, str]:
    """PRED JSONL for VQA: ``{"id": ..., "answer": "..."}`` (or ``"caption"``) per line."""
    path = Path(path)
    out: dict[str, str] = {}
    for line_no, obj in iter_json_lines(path):
        answer = obj.get("answer", obj.get("caption"))
        if not isinstance(answer, str):
            raise CaptionDataError(f"{path}:{line_no}: missing 'answer' string")
        key = str(obj["id"])
        if key in out:
            raise CaptionDataError(f"{path}:{line_no}: duplicate id {key!r}")
        out[key] = answer
    return out


def evaluate_vqa_files(pred: str | Path, ref: str | Path) -> dict[str, Any]:
    """Score a PRED answers JSONL against a REF JSONL (``{"id", "captions": [answers]}``,
    as written by ``tools/convert_dataset.py --format fmiqa --ref-out``)."""
    from ernie_vilg.metrics.caption import read_ref_jsonl

    return score_vqa(read_answers(pred), read_ref_jsonl(ref), str(pred), str(ref))
