"""Real-data check: COCO-CN test references + the published seq-learn predictions.

Character level must give ERNIE-ViLG Table 3's seq-learn row; word level (as stored,
pre-segmented) must give the official numbers in the `overall` block of result_seqlearn.txt.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ernie_vilg.metrics.caption import (
    read_coco_eval_overall,
    read_coco_refs,
    read_coco_results,
    score_captions,
)

DATA = Path(__file__).resolve().parents[2] / "shared/eval/coco-cn"
REFS = DATA / "merged_captions_coco-cn_test.json"
PREDS = DATA / "result_seqlearn.txt"

pytestmark = pytest.mark.skipif(not (REFS.is_file() and PREDS.is_file()),
                                reason=f"COCO-CN evaluation files not found in {DATA}")

# ERNIE-ViLG Table 3, seq-learn row (character level).
TABLE3_SEQLEARN = {"BLEU-4": 48.4, "METEOR": 29.5, "ROUGE-L": 59.2, "CIDEr": 128.4}


@pytest.fixture(scope="module")
def data() -> tuple[dict, dict]:
    return read_coco_results(PREDS), read_coco_refs(REFS)


@pytest.fixture(scope="module")
def char_scores(data) -> dict:
    preds, refs = data
    return score_captions(preds, refs, tokenization="char")


@pytest.fixture(scope="module")
def word_scores(data) -> dict:
    preds, refs = data
    return score_captions(preds, refs, tokenization="whitespace")


def _meteor_or_skip(scores: dict) -> float:
    if scores["METEOR"] is None:
        if shutil.which("java") is None:
            pytest.skip("java not on PATH: METEOR cannot run")
        pytest.fail(f"METEOR failed although java is available: {scores.get('METEOR_error')}")
    return scores["METEOR"]


def test_files_hold_the_full_test_split(data):
    preds, refs = data
    assert len(preds) == len(refs) == 1000
    assert sum(len(v) for v in refs.values()) == 6033


@pytest.mark.parametrize("metric", ["BLEU-4", "ROUGE-L", "CIDEr"])
def test_char_level_reproduces_table3_seq_learn(char_scores, metric):
    assert char_scores["count"] == 1000
    assert char_scores[metric] == pytest.approx(TABLE3_SEQLEARN[metric], abs=0.15)


def test_char_level_meteor_reproduces_table3(char_scores):
    assert _meteor_or_skip(char_scores) == pytest.approx(TABLE3_SEQLEARN["METEOR"], abs=0.15)


def test_word_level_reproduces_official_overall(word_scores):
    official = read_coco_eval_overall(PREDS)
    assert set(official) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    for metric, value in official.items():
        got = _meteor_or_skip(word_scores) if metric == "METEOR" else word_scores[metric]
        # The file stores 3 decimals (0-1 scale): half a unit is 0.05 on our 0-100 scale.
        assert got == pytest.approx(value, abs=0.06), metric


def test_char_and_word_levels_differ(char_scores, word_scores):
    # Guards against a tokenization switch that silently does nothing.
    assert char_scores["BLEU-4"] - word_scores["BLEU-4"] > 5
