"""Dataset readers: fixtures in the released formats -> manifest + REF JSONL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_vilg.data.manifest import read_manifest
from ernie_vilg.data.readers import (
    DatasetFormatError,
    clean_caption,
    convert_dataset,
    read_aic_icc,
    read_coco_cn,
    read_fmiqa,
    load_coco_captions,
)
from ernie_vilg.metrics.caption import read_ref_jsonl

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests/fixtures/datasets"
AIC = FIX / "aic_icc/caption_validation_annotations_20170910.json"
COCO_CN = FIX / "coco_cn"
FMIQA = FIX / "fmiqa/fmiqa.json"
COCO = FIX / "coco/captions_val2014.json"


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\xff\xd8\xff")  # existence is all the converter checks


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_clean_caption_strips_newlines_and_trailing_full_stop():
    assert clean_caption("\n两个女孩\n在草地上奔跑。\n") == "两个女孩在草地上奔跑"


def test_aic_icc_to_manifest_with_relative_paths_and_refs(tmp_path):
    images = tmp_path / "imgs"
    items = read_aic_icc(AIC)
    assert len(items) == 3 and all(len(it.texts) == 5 for it in items)
    assert items[1].texts[0] == "两个穿着运动服的女孩在草地上奔跑"
    assert not any("\n" in t or t.endswith("。") for it in items for t in it.texts)
    _touch(images, *(it.key for it in items[:2]))  # the third image is missing
    out = tmp_path / "out/manifest.jsonl"
    report = convert_dataset("aic_icc", [AIC], images, out, ref_out=tmp_path / "out/ref.jsonl")
    assert (report.items, report.written, report.missing_images) == (3, 2, 1)
    assert report.missing_examples[0].endswith("b96ff46ea51cc9bd1e6f4d11d1e0a3d1dcd6a2e4.jpg")
    rows = _lines(out)
    assert rows[0]["image"] == "../imgs/3cd32bef87ed98572bac868418521852ac3f6a70.jpg"
    assert rows[0]["text"] == rows[0]["texts"][0] and len(rows[0]["texts"]) == 5
    assert rows[0]["url"].startswith("http://")
    # The project's manifest reader resolves the relative path to the real file.
    recs = read_manifest(out, strict=True)
    assert Path(recs[0].image_path).resolve() == (images / rows[0]["id"]).resolve()
    refs = read_ref_jsonl(tmp_path / "out/ref.jsonl")
    assert list(refs) == [rows[0]["id"], rows[1]["id"]] and len(refs[rows[0]["id"]]) == 5


def test_no_check_images_keeps_everything(tmp_path):
    report = convert_dataset("aic_icc", [AIC], tmp_path / "none", tmp_path / "m.jsonl", check_images=False)
    assert (report.written, report.missing_images) == (3, 0)


def test_per_caption_writes_one_line_per_sentence(tmp_path):
    report = convert_dataset("aic_icc", [AIC], tmp_path, tmp_path / "m.jsonl", check_images=False,
                             per_caption=True)
    rows = _lines(tmp_path / "m.jsonl")
    assert report.written == 15 and [r["caption_index"] for r in rows[:5]] == [0, 1, 2, 3, 4]
    assert "texts" not in rows[0]


def test_coco_cn_split_selects_ids_and_finds_images_in_split_subfolders(tmp_path):
    items = read_coco_cn([COCO_CN], split="train")
    assert [it.key for it in items] == ["COCO_train2014_000000504987", "COCO_train2014_000000179672"]
    _touch(tmp_path, "train2014/COCO_train2014_000000504987.jpg", "COCO_train2014_000000179672.jpg")
    report = convert_dataset("coco_cn", [COCO_CN], tmp_path, tmp_path / "m.jsonl", split="train")
    rows = _lines(tmp_path / "m.jsonl")
    assert report.written == 2
    assert [r["image"] for r in rows] == ["train2014/COCO_train2014_000000504987.jpg",
                                          "COCO_train2014_000000179672.jpg"]
    all_items = read_coco_cn([COCO_CN / "imageid.human-written-caption.txt"])
    assert len(all_items) == 4
    assert next(it for it in all_items if it.key.endswith("412975")).texts == ["一个女人在街道上行走", "街上走着一位女士"]


def test_coco_cn_merged_test_references_to_ref_jsonl(tmp_path):
    report = convert_dataset("coco_cn", [COCO_CN / "merged_captions_coco-cn_test.json"], tmp_path,
                             tmp_path / "m.jsonl", ref_out=tmp_path / "ref.jsonl", check_images=False)
    assert report.written == 2
    assert read_ref_jsonl(tmp_path / "ref.jsonl")["8"] == ["一个 女人 在 街道 上 行走", "一位 女士 走 在 城市 的 街道 上"]
    assert _lines(tmp_path / "m.jsonl")[1]["image"] == "COCO_train2014_000000179672.jpg"


def test_coco_cn_split_id_without_caption_is_an_error(tmp_path):
    (tmp_path / "imageid.human-written-caption.txt").write_text("COCO_val2014_000000000001#0\t一只猫\n")
    (tmp_path / "coco-cn_val.txt").write_text("COCO_val2014_000000000001\nCOCO_val2014_000000000002\n")
    with pytest.raises(DatasetFormatError, match=r"coco-cn_val\.txt: 1 id\(s\) have no caption"):
        read_coco_cn([tmp_path], split="val")


def test_coco_cn_malformed_caption_line_names_file_and_line(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_text("COCO_val2014_000000000001#0\t一只猫\nCOCO_val2014_000000000002 一只狗\n")
    with pytest.raises(DatasetFormatError, match=r"caps\.txt:2: expected '<image id>#<n><TAB><caption>'"):
        read_coco_cn([path])
    path.write_bytes(b"COCO_val2014_000000000001#0\t\xe4\xb8\x80\nCOCO_val2014_000000000002#0\t\xff\n")
    with pytest.raises(DatasetFormatError, match=r"caps\.txt:2: not UTF-8"):
        read_coco_cn([path])


def test_fmiqa_keeps_question_and_answer(tmp_path):
    items = read_fmiqa(FMIQA, split="val")
    assert [it.key for it in items] == ["200001", "200002"]
    _touch(tmp_path, "val2014/COCO_val2014_000000217153.jpg")
    report = convert_dataset("fmiqa", [FMIQA], tmp_path, tmp_path / "m.jsonl", split="val",
                             ref_out=tmp_path / "ref.jsonl")
    assert (report.written, report.missing_images) == (1, 1)
    row = _lines(tmp_path / "m.jsonl")[0]
    assert row["image"] == "val2014/COCO_val2014_000000217153.jpg"
    assert (row["question"], row["answer"], row["text"], row["id"]) == ("狗是什么颜色的？", "棕色", "棕色", 200001)
    assert read_ref_jsonl(tmp_path / "ref.jsonl") == {"200001": ["棕色"]}
    assert len(read_fmiqa(FMIQA)) == 4  # both splits


def test_fmiqa_missing_field_names_item(tmp_path):
    path = tmp_path / "fm.json"
    path.write_text(json.dumps({"train": [{"question_id": 1, "image_id": 2, "Question": "什么？", "Answer": "猫"},
                                          {"question_id": 3, "image_id": 4, "Question": "什么？"}]}))
    with pytest.raises(DatasetFormatError, match=r"fm\.json: train\[1\]: missing 'Answer'"):
        read_fmiqa(path)
    with pytest.raises(DatasetFormatError, match="no split 'val'"):
        read_fmiqa(path, split="val")


def test_coco_captions_group_by_image(tmp_path):
    images = load_coco_captions(COCO)
    assert [im.id for im in images] == [391895, 522418, 184613]
    assert images[1].captions == ["一个女人在厨房里用刀切一个大蛋糕", "一位女士正在切蛋糕"]
    _touch(tmp_path, "val2014/COCO_val2014_000000391895.jpg")
    report = convert_dataset("coco", [COCO], tmp_path, tmp_path / "m.jsonl")
    assert (report.written, report.missing_images) == (1, 2)


def test_aic_icc_malformed_item_and_broken_json_are_located(tmp_path):
    path = tmp_path / "aic.json"
    path.write_text(json.dumps([{"image_id": "a.jpg", "caption": ["猫"]}, {"url": "x", "caption": ["狗"]}]))
    with pytest.raises(DatasetFormatError, match=r"aic\.json: item 1: missing 'image_id'"):
        read_aic_icc(path)
    path.write_text('[{"image_id": "a.jpg",\n "caption": ["猫"]\n')
    with pytest.raises(DatasetFormatError, match=r"aic\.json:3: not valid JSON"):
        read_aic_icc(path)


def test_coco_annotation_for_unknown_image_is_an_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 2, "id": 1, "caption": "猫"}]}))
    with pytest.raises(DatasetFormatError, match=r"c\.json: annotations\[0\]: image_id 2 is not in 'images'"):
        load_coco_captions(path)


def test_cli_prints_report_and_fails_cleanly(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / "tools/convert_dataset.py"), "--format", "coco", "--input", str(COCO),
           "--images", str(tmp_path), "--out", str(tmp_path / "m.jsonl")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["missing_images"] == 3
    bad = subprocess.run(cmd[:5] + [str(AIC)] + cmd[6:], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and AIC.name in bad.stderr and "expected a COCO caption JSON" in bad.stderr
