"""Caption metrics on small hand-checked cases, the readers' error messages, and the CLI."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_vilg.metrics import caption
from ernie_vilg.metrics.caption import (
    CaptionDataError,
    MeteorJar,
    char_tokens,
    read_coco_results,
    read_pred_jsonl,
    read_ref_jsonl,
    score_captions,
    tokenize,
    whitespace_tokens,
)

REPO = Path(__file__).resolve().parents[1]
HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not on PATH")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- tokenization


def test_char_tokens_drop_whitespace_and_unicode_punctuation_and_lowercase():
    assert char_tokens(" 一只Cat，在 “盒子”里！\n") == ["一", "只", "c", "a", "t", "在", "盒", "子", "里"]


def test_whitespace_tokens_keep_segmentation_and_drop_punctuation_tokens():
    assert whitespace_tokens("一个 女人 在 街道 上 , 行走 。") == ["一个", "女人", "在", "街道", "上", "行走"]


def test_word_tokens_use_jieba_segmentation():
    toks = tokenize("我爱北京天安门。", "word")
    assert "北京" in toks and "。" not in toks
    assert "".join(toks) == "我爱北京天安门"


def test_unknown_tokenization_raises():
    with pytest.raises(ValueError, match="tokenization"):
        tokenize("猫", "bpe")


# ----------------------------------------------------------------------------- scores


def test_bleu_and_rouge_match_closed_form():
    # Prediction is a prefix of the reference: all n-gram precisions are 1, only brevity counts.
    s = score_captions({"a": "猫坐在垫子上"}, {"a": ["猫坐在垫子上面"]}, metrics=("BLEU", "ROUGE-L"))
    bp = math.exp(1 - 7 / 6)
    for n in range(1, 5):
        assert s[f"BLEU-{n}"] == pytest.approx(100 * bp, abs=1e-4)
    p, r, beta = 1.0, 6 / 7, 1.2
    assert s["ROUGE-L"] == pytest.approx(100 * (1 + beta**2) * p * r / (r + beta**2 * p), abs=1e-4)
    assert s["count"] == 1 and "METEOR" not in s and "CIDEr" not in s


def test_tokenization_changes_the_score():
    preds = {"1": "一个男人在骑自行车"}
    refs = {"1": ["一个男孩在骑车"]}
    char = score_captions(preds, refs, "char", metrics=("BLEU",))
    word = score_captions(preds, refs, "word", metrics=("BLEU",))
    assert char["BLEU-1"] != pytest.approx(word["BLEU-1"])


def test_cider_rewards_the_right_image():
    refs = {"1": ["一只猫躺在沙发上", "沙发上有一只猫"], "2": ["两个人在海边冲浪", "海上有人冲浪"],
            "3": ["一辆红色的公交车停在路边", "路边停着公交车"]}
    good = score_captions({"1": "一只猫在沙发上", "2": "两个人在冲浪", "3": "红色公交车停在路边"}, refs,
                          metrics=("CIDEr",))
    swapped = score_captions({"1": "两个人在冲浪", "2": "红色公交车停在路边", "3": "一只猫在沙发上"}, refs,
                             metrics=("CIDEr",))
    assert good["CIDEr"] > 100 > swapped["CIDEr"]


@needs_java
def test_meteor_exact_runs_and_rewards_matches():
    refs = {"1": ["一只猫躺在沙发上"], "2": ["两个人在海边冲浪"]}
    same = score_captions({"1": "一只猫躺在沙发上", "2": "两个人在海边冲浪"}, refs, metrics=("METEOR",))
    other = score_captions({"1": "两个人在海边冲浪", "2": "一只猫躺在沙发上"}, refs, metrics=("METEOR",))
    assert same["METEOR"] > 90 and other["METEOR"] < 20


@needs_java
def test_meteor_process_is_closed_after_scoring():
    with MeteorJar() as m:
        total, items = m.score(["猫 在 睡 觉"], [["猫 在 睡 觉", "一 只 猫"]])
        proc = m.proc
    assert proc.poll() is not None
    assert len(items) == 1 and 0.5 < total <= 1.0


def test_meteor_without_java_is_null_with_reason_and_rest_is_scored(monkeypatch):
    monkeypatch.setattr(caption.shutil, "which", lambda name: None)
    s = score_captions({"1": "一只猫"}, {"1": ["一只猫"]})
    assert s["METEOR"] is None and "java" in s["METEOR_error"]
    assert s["BLEU-1"] == pytest.approx(100.0, abs=1e-4) and s["ROUGE-L"] == pytest.approx(100.0)


def test_missing_and_extra_ids_are_named():
    with pytest.raises(CaptionDataError, match=r"1 id\(s\) of refs.jsonl have no prediction.*'3'"):
        score_captions({"1": "猫", "2": "狗"}, {"1": ["猫"], "2": ["狗"], "3": ["鸟"]},
                       pred_name="preds.jsonl", ref_name="refs.jsonl")
    with pytest.raises(CaptionDataError, match=r"not in refs.jsonl.*'9'"):
        score_captions({"1": "猫", "9": "狗"}, {"1": ["猫"]}, pred_name="preds.jsonl", ref_name="refs.jsonl")


def test_caption_with_only_punctuation_is_rejected():
    with pytest.raises(CaptionDataError, match="id '1'.*empty"):
        score_captions({"1": "。！"}, {"1": ["猫"]})


# ----------------------------------------------------------------------------- readers


def test_readers_round_trip_and_int_ids_match_string_ids(tmp_path):
    pred = _jsonl(tmp_path / "p.jsonl", [{"id": 1, "caption": "一只猫"}, {"id": "b", "caption": "狗"}])
    ref = _jsonl(tmp_path / "r.jsonl", [{"id": "1", "captions": ["一只猫", "猫"]}, {"id": "b", "captions": ["狗"]}])
    assert read_pred_jsonl(pred) == {"1": "一只猫", "b": "狗"}
    assert read_ref_jsonl(ref) == {"1": ["一只猫", "猫"], "b": ["狗"]}


@pytest.mark.parametrize("content, message", [
    (b'{"id": 1, "caption": "\xe7\x8c\xab"}\n{"id": 2, "caption": "\xff\xfe"}\n', r"p\.jsonl:2: not UTF-8"),
    (b'{"id": 1, "caption": "cat"}\n{"id": 2, "caption": \n', r"p\.jsonl:2: not valid JSON"),
    (b'{"id": 1, "caption": "cat"}\n\n{"id": 2, "caption": " \xe3\x80\x82 "}\n', r"p\.jsonl:3: empty caption"),
    (b'{"id": 1, "caption": "cat"}\n{"id": 1, "caption": "dog"}\n', r"p\.jsonl:2: duplicate id '1' \(first on line 1\)"),
    (b'{"caption": "cat"}\n', r"p\.jsonl:1: missing 'id'"),
])
def test_pred_reader_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(CaptionDataError, match=message):
        read_pred_jsonl(path)


def test_ref_reader_rejects_empty_reference_list_and_empty_reference(tmp_path):
    with pytest.raises(CaptionDataError, match=r"r\.jsonl:1: 'captions' must be a non-empty list"):
        read_ref_jsonl(_jsonl(tmp_path / "r.jsonl", [{"id": 1, "captions": []}]))
    with pytest.raises(CaptionDataError, match=r"r\.jsonl:1: empty caption in 'captions\[1\]'"):
        read_ref_jsonl(_jsonl(tmp_path / "r.jsonl", [{"id": 1, "captions": ["猫", "  "]}]))


def test_coco_results_list_format(tmp_path):
    path = tmp_path / "res.json"
    path.write_text(json.dumps([{"image_id": 5, "caption": "一只 猫"}, {"image_id": 7, "caption": "狗"}]))
    assert read_coco_results(path) == {"5": "一只 猫", "7": "狗"}


# ----------------------------------------------------------------------------- CLI


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(REPO / "tools/eval_caption.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_prints_one_json_object_with_the_public_keys(tmp_path):
    pred = _jsonl(tmp_path / "p.jsonl", [{"id": 1, "caption": "一只猫躺在沙发上"}, {"id": 2, "caption": "海边冲浪"}])
    ref = _jsonl(tmp_path / "r.jsonl", [{"id": 1, "captions": ["一只猫躺在沙发上"]},
                                         {"id": 2, "captions": ["两个人在海边冲浪"]}])
    out = _run_cli("--pred", str(pred), "--ref", str(ref), "--tokenization", "word")
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)
    expected = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "count"}
    assert expected <= set(scores)
    assert scores["count"] == 2 and scores["tokenization"] == "word"
    assert 0 < scores["BLEU-1"] <= 100
    assert (scores["METEOR"] is None) == (not HAS_JAVA)


def test_cli_exits_with_message_on_missing_ids(tmp_path):
    pred = _jsonl(tmp_path / "p.jsonl", [{"id": 1, "caption": "猫"}])
    ref = _jsonl(tmp_path / "r.jsonl", [{"id": 1, "captions": ["猫"]}, {"id": 2, "captions": ["狗"]}])
    out = _run_cli("--pred", str(pred), "--ref", str(ref))
    assert out.returncode == 2 and out.stdout == ""
    assert "r.jsonl" in out.stderr and "'2'" in out.stderr
