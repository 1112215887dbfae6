"""The synthetic shapes world (generator, captions, parser) and its pixel judge."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ernie_vilg.data.manifest import read_manifest
from ernie_vilg.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    Scene,
    ShapeObject,
    PERTURBATIONS,
    caption_scene,
    caption_with_template,
    claims_hold,
    make_item,
    parse_caption,
    perturb_scene,
    sample_scene,
    write_shapes_dataset,
)
from ernie_vilg.data.shapes_judge import analyse_image, degrade, judge_accuracy, judge_image

N_JUDGE = 1000  # images of the test split scored in the accuracy checks


@lru_cache(maxsize=1)
def _test_items(n: int = N_JUDGE, size: int = 64) -> list[tuple[Image.Image, dict]]:
    return [make_item(0, "test", i, size=size) for i in range(n)]


@lru_cache(maxsize=1)
def _test_components() -> list[list]:
    return [analyse_image(img) for img, _ in _test_items()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- generator

def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    counts = write_shapes_dataset(a, 12, 4, 4, size=64, seed=7)
    write_shapes_dataset(b, 12, 4, 4, size=64, seed=7)
    write_shapes_dataset(c, 12, 4, 4, size=64, seed=8)
    assert counts == {"train": 12, "val": 4, "test": 4}
    ta, tb = _tree_bytes(a), _tree_bytes(b)
    assert len(ta) == 12 + 4 + 4 + 3 + 1  # images, three manifests, shapes.json
    assert ta == tb
    assert _tree_bytes(c)["train.jsonl"] != ta["train.jsonl"]
    assert not list(a.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_items_do_not_depend_on_other_split_sizes(tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path / "a", 5, 2, 3, seed=1)
    write_shapes_dataset(tmp_path / "b", 3, 9, 3, seed=1)
    for name in ("images/train_000002.png", "images/test_000002.png", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_manifest_lines_follow_the_project_format(tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path, 30, 3, 3, seed=0, max_objects=3)
    raw = (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert "\\u" not in raw[0] and "形" in raw[0]  # ensure_ascii=False
    recs = read_manifest(tmp_path / "train.jsonl", strict=True)
    assert len(recs) == 30
    for line, rec in zip(raw, recs):
        obj = json.loads(line)
        assert list(obj) == ["image", "text", "texts", "attrs"]  # stable key order
        assert obj["image"].startswith("images/") and Path(rec.image_path).is_file()
        assert len(obj["texts"]) == 5 and len(set(obj["texts"])) == 5 and obj["text"] in obj["texts"]
        attrs = obj["attrs"]
        assert 1 <= attrs["count"] == len(attrs["objects"]) <= 3
        cells = [tuple(o["cell"]) for o in attrs["objects"]]
        assert len(set(cells)) == len(cells)  # distinct cells
        for o in attrs["objects"]:
            assert list(o) == ["shape", "colour", "size", "cell", "position"]
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in ("大", "小")
            assert o["position"] == POSITIONS[tuple(o["cell"])]
        with Image.open(rec.image_path) as im:
            assert im.size == (64, 64) and im.mode == "RGB"


def test_scene_sampler_covers_the_vocabulary() -> None:
    seen = {"shape": set(), "colour": set(), "size": set(), "cell": set(), "count": set()}
    for i in range(400):
        scene = sample_scene(np.random.default_rng(i), max_objects=3)
        seen["count"].add(len(scene.objects))
        for o in scene.objects:
            seen["shape"].add(o.shape), seen["colour"].add(o.colour)
            seen["size"].add(o.size), seen["cell"].add(o.cell)
    assert seen["shape"] == set(SHAPES) and len(SHAPES) >= 4
    assert seen["colour"] == set(COLOURS) and len(COLOURS) >= 6
    assert seen["size"] == {"大", "小"} and len(seen["cell"]) == 9 and seen["count"] == {1, 2, 3}
    with pytest.raises(ValueError):
        sample_scene(np.random.default_rng(0), shapes=["五角星"])


@pytest.mark.parametrize("size", [32, 48, 64, 128, 256])
def test_render_uses_only_pure_palette_colours(size: int) -> None:
    img, rec = make_item(3, "train", 5, size=size, max_objects=3)
    assert img.size == (size, size)
    allowed = {tuple(v) for v in COLOURS.values()} | {BACKGROUNDS["黑色"]}
    colours = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
    assert colours <= allowed  # no anti-aliasing: every pixel is background or a palette colour
    res = judge_image(img, rec["attrs"])
    assert res.count_ok and res.colour_ok and res.position_ok
    if size >= 64:
        assert res.all_ok


# ----------------------------------------------------------------------------- captions

def test_parse_caption_round_trips_every_template() -> None:
    used = set()
    for i in range(300):
        rng = np.random.default_rng(1000 + i)
        scene = sample_scene(rng, max_objects=3)
        attrs = scene.to_attrs()
        pool = TEMPLATES if len(scene.objects) > 1 else [t for t in TEMPLATES if t != "t6"]
        for t in pool:
            text = caption_with_template(scene, t, rng)
            claims = parse_caption(text)
            assert claims_hold(claims, attrs), (text, claims, attrs)
            # absolute positions come back exactly, in caption order
            absolute = [o for o in claims["objects"] if o["relation"] is None]
            for o in absolute:
                assert len(o["cells"]) == 1 and o["position"] == POSITIONS[tuple(o["cells"][0])]
            if any(o["relation"] for o in claims["objects"]):
                used.add("relation")
            used.add(t)
    assert used == set(TEMPLATES) | {"relation"}


def test_caption_scene_gives_distinct_paraphrases() -> None:
    scene = Scene([ShapeObject("圆形", "红色", "大", 1, 1), ShapeObject("正方形", "蓝色", "小", 1, 0)])
    texts = caption_scene(scene, np.random.default_rng(0), num_texts=5)
    assert len(set(texts)) == 5
    t6 = caption_with_template(scene, "t6", np.random.default_rng(3))
    assert "它的" in t6  # the two objects share a row, so t6 states their relation
    single = Scene([ShapeObject("三角形", "绿色", "小", 0, 2)])
    assert len(set(caption_scene(single, np.random.default_rng(0)))) == 5


@pytest.mark.parametrize(
    "bad",
    [
        "一只猫坐在桌子上。",
        "左上角有一个大的红色圆形，中间有一只狗。",
        "左上角有一个大的粉色圆形。",
        "它的左边有一个小的蓝色正方形。",
        "左上角有一个大的红色五角星。",
        "",
    ],
)
def test_parse_caption_rejects_malformed_text_naming_it(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_caption(bad)
    assert repr(bad) in str(err.value)


def test_parse_caption_reads_stated_count_and_relations() -> None:
    claims = parse_caption("图中有三个图形：中间是一个红色的大圆形。")
    assert claims["count"] == 3 and len(claims["objects"]) == 1
    claims = parse_caption("左边有一个大的红色圆形，它的右侧有一个小的蓝色正方形。")
    rel = claims["objects"][1]
    assert rel["relation"] == {"anchor": 0, "relation": "右边"}
    assert rel["cells"] == [[1, 1], [1, 2]]


# ----------------------------------------------------------------------------- judge

def test_judge_accepts_true_captions_of_1000_images() -> None:
    items = _test_items()
    results = [judge_image(img, rec["text"], components=c) for (img, rec), c in zip(items, _test_components())]
    acc = judge_accuracy(results)
    assert acc["n"] == N_JUDGE
    assert acc["all"] >= 0.99, acc
    # every paraphrase and the ground-truth attrs are accepted too (first 200 images)
    for (img, rec), comps in list(zip(items, _test_components()))[:200]:
        assert judge_image(img, rec["attrs"], components=comps).all_ok
        assert all(judge_image(img, t, components=comps).all_ok for t in rec["texts"])


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_judge_rejects_captions_with_one_attribute_changed(kind: str) -> None:
    rejected = judged = 0
    for i, ((img, rec), comps) in enumerate(zip(_test_items(), _test_components())):
        rng = np.random.default_rng([99, i])
        wrong = perturb_scene(rec["attrs"], kind, rng)
        pool = TEMPLATES if len(wrong.objects) > 1 else [t for t in TEMPLATES if t != "t6"]
        text = caption_with_template(wrong, pool[int(rng.integers(len(pool)))], rng)
        if claims_hold(parse_caption(text), rec["attrs"]):
            continue  # a relation ("它的右边") can stay true after a move: not a wrong caption
        judged += 1
        rejected += not judge_image(img, text, components=comps).all_ok
    assert judged >= 0.9 * N_JUDGE
    assert rejected / judged >= 0.95, (kind, rejected, judged)


def test_judge_is_robust_to_blur_and_jpeg() -> None:
    results = [judge_image(degrade(img, sigma=1.0, jpeg_quality=50), rec["text"]) for img, rec in _test_items()]
    acc = judge_accuracy(results)
    assert acc["all"] >= 0.95, acc
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.95, acc


def test_judge_takes_arrays_and_reports_details() -> None:
    img, rec = _test_items()[0]
    arr = np.asarray(img)
    assert judge_image(arr, rec["text"]).all_ok
    assert judge_image(arr.transpose(2, 0, 1).astype(np.float32) / 255.0, rec["text"]).all_ok
    res = judge_image(Image.new("RGB", (64, 64)), rec["text"])  # an empty image shows nothing
    assert not res.all_ok and res.detected_count == 0 and not res.colour_ok
    d = res.to_dict()
    assert set(d) >= {"all_ok", "colour_ok", "shape_ok", "position_ok", "count_ok", "objects"}
    acc = judge_accuracy([res])
    assert set(acc) >= {"n", "shape", "colour", "position", "size", "count", "all"}
    with pytest.raises(ValueError, match="一只猫"):
        judge_image(img, "一只猫。")


def test_make_shapes_cli(tmp_path: Path, repo_root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    out = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "make_shapes.py"), "--out", str(tmp_path / "d"),
         "--num-train", "3", "--num-val", "1", "--num-test", "2", "--size", "48", "--seed", "0",
         "--max-objects", "2", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["counts"] == {"train": 3, "val": 1, "test": 2}
    lines = (tmp_path / "d" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(json.loads(l)["attrs"]["count"] <= 2 for l in lines)
