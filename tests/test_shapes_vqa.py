"""Shapes-world VQA set: answers follow from the ground truth; the set is deterministic per seed."""
import json
import subprocess
import sys

import numpy as np
import pytest

from ernie_vilg.data.shapes import write_shapes_dataset
from ernie_vilg.data.shapes_vqa import (
    QTYPES, answer_from_attrs, candidate_questions, count_word, make_vqa_manifest, questions_for,
)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(out, 60, 0, 0, size=32, seed=3)
    return out


def _attrs(*objs):
    return {"count": len(objs), "background": "黑色", "objects": [
        {"shape": s, "colour": c, "size": z, "cell": list(cell), "position": ""} for s, c, z, cell in objs]}


def test_examples_from_a_known_scene():
    attrs = _attrs(("圆形", "红色", "大", (0, 0)), ("三角形", "蓝色", "小", (2, 2)), ("圆形", "红色", "小", (1, 1)))
    cands = candidate_questions(attrs, np.random.default_rng(0))
    assert cands["count"] == ("图中有几个物体？", "三个")
    assert cands["where"] == ("蓝色的三角形在哪里？", "右下")  # the red circles are ambiguous
    assert cands["shape_of_colour"] == ("蓝色的物体是什么形状？", "三角形")
    assert cands["colour_of_shape"] == ("三角形是什么颜色的？", "蓝色")
    q, a = cands["count_colour"]
    assert (q, a) in {("图中有几个红色的物体？", "两个"), ("图中有几个蓝色的物体？", "一个")}


def test_ambiguous_questions_are_not_asked():
    attrs = _attrs(("圆形", "红色", "大", (0, 0)), ("圆形", "红色", "小", (0, 2)))
    cands = candidate_questions(attrs, np.random.default_rng(1))
    assert "shape_of_colour" not in cands and "colour_of_shape" not in cands and "where" not in cands
    assert cands["count_colour"] == ("图中有几个红色的物体？", "两个")


def test_count_words():
    assert [count_word(n) for n in (1, 2, 3)] == ["一个", "两个", "三个"]


def test_every_answer_agrees_with_attrs(shapes_dir, tmp_path):
    out = tmp_path / "vqa.jsonl"
    summary = make_vqa_manifest(shapes_dir / "train.jsonl", out, per_image=4, seed=0)
    src = [json.loads(l) for l in (shapes_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    lines = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert summary["images"] == 60 and summary["questions"] == len(lines) == 240
    assert set(summary["per_qtype"]) <= set(QTYPES) and len(summary["per_qtype"]) >= 6
    for rec in lines:
        attrs = src[rec["image_id"]]["attrs"]
        assert rec["answer"] == rec["text"] == rec["texts"][0]
        assert answer_from_attrs(attrs, rec["qtype"], rec["question"]) == rec["answer"], rec
        assert (tmp_path / rec["image"]).resolve() == (shapes_dir / src[rec["image_id"]]["image"]).resolve()
    # questions of one image are of distinct kinds
    per_image = {}
    for rec in lines:
        per_image.setdefault(rec["image_id"], []).append(rec["qtype"])
    assert all(len(set(k)) == len(k) for k in per_image.values())


def test_deterministic_per_seed(shapes_dir, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    make_vqa_manifest(shapes_dir / "train.jsonl", a, seed=5)
    make_vqa_manifest(shapes_dir / "train.jsonl", b, seed=5)
    make_vqa_manifest(shapes_dir / "train.jsonl", c, seed=6)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_questions_for_respects_subset_and_count():
    attrs = _attrs(("菱形", "绿色", "大", (1, 2)))
    qs = questions_for(attrs, np.random.default_rng(0), per_image=2, qtypes=("where", "count"))
    assert sorted(q[0] for q in qs) == ["count", "where"]
    assert dict((k, a) for k, _, a in qs) == {"count": "一个", "where": "右边"}


def test_tool_runs(shapes_dir, tmp_path, repo_root):
    out = tmp_path / "vqa.jsonl"
    res = subprocess.run([sys.executable, str(repo_root / "tools" / "make_shapes_vqa.py"), "--manifest",
                          str(shapes_dir / "train.jsonl"), "--out", str(out), "--per-image", "2"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["questions"] == 120
