"""VQA answer scores: exact match and character F1 after character normalisation."""
from __future__ import annotations

import json

import pytest

from ernie_vilg.metrics.caption import CaptionDataError
from ernie_vilg.metrics.vqa import char_f1, evaluate_vqa_files, exact_match, normalize_answer, score_vqa


def test_normalisation_drops_punctuation_space_and_case():
    assert normalize_answer(" 是的，Yes! ") == "是的yes"
    assert exact_match("棕色。", ["白色", "棕 色"]) == 1.0
    assert exact_match("棕色的", ["棕色"]) == 0.0


def test_char_f1_closed_form_and_best_reference():
    # pred 在街道上 (4 chars) vs ref 街道 (2): overlap 2 -> P 0.5, R 1, F1 2/3.
    assert char_f1("在街道上", ["街道"]) == pytest.approx(2 / 3)
    assert char_f1("在街道上", ["公园", "街道"]) == pytest.approx(2 / 3)
    assert char_f1("猫猫", ["猫"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset, not set
    assert char_f1("。", ["猫"]) == 0.0


def test_score_vqa_averages_over_questions():
    s = score_vqa({1: "棕色", 2: "在街道上", 3: "！"}, {"1": ["棕色"], "2": "街道", "3": ["两只"]})
    assert s["count"] == 3
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["char_f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_mismatched_ids_and_empty_references_raise():
    with pytest.raises(CaptionDataError, match="no prediction"):
        score_vqa({"1": "a"}, {"1": ["a"], "2": ["b"]})
    with pytest.raises(CaptionDataError, match="id '1' has an empty reference"):
        score_vqa({"1": "a"}, {"1": ["？"]})


def test_files_with_answer_field(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": 200001, "answer": "棕色的"}\n{"id": 200002, "answer": "街道上"}\n',
                                      encoding="utf-8")
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": 200001, "captions": ["棕色"]}, ensure_ascii=False) + "\n"
                                      + json.dumps({"id": 200002, "captions": ["在街道上"]}, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    s = evaluate_vqa_files(tmp_path / "p.jsonl", tmp_path / "r.jsonl")
    assert s["exact_match"] == 0.0 and s["char_f1"] == pytest.approx(100 * (0.8 + 6 / 7) / 2)
    (tmp_path / "p.jsonl").write_text('{"id": 1, "text": "x"}\n')
    with pytest.raises(CaptionDataError, match=r"p\.jsonl:1: missing 'answer'"):
        evaluate_vqa_files(tmp_path / "p.jsonl", tmp_path / "r.jsonl")
