"""A shapes-world VQA set (FM-IQA-like): Chinese questions about colour, shape, count, position.

From a shapes manifest (each line carries the ground truth `attrs`, see data/shapes.py), every
image gets up to `per_image` questions of distinct kinds, each with a short Chinese answer that
follows from `attrs` alone:

    count            图中有几个物体？                      -> 两个
    colour_at        左上角的物体是什么颜色？              -> 红色
    shape_at         中间的物体是什么形状？                -> 圆形
    size_at          右边的物体是大的还是小的？            -> 大的
    shape_of_colour  红色的物体是什么形状？                -> 圆形   (only if one object is red)
    colour_of_shape  三角形是什么颜色的？                  -> 蓝色   (only if one triangle)
    where            蓝色的三角形在哪里？                  -> 右下   (only if one blue triangle)
    count_colour     图中有几个红色的物体？                -> 两个   (a colour present in the image)

Position answers are the canonical cell names of data/shapes.py (左上 上方 右上 左边 中间 右边
左下 下方 右下); questions name a cell with one of its caption surface forms (左上角, 正中间...).
Output lines follow the FM-IQA manifest written by data/readers.py: `text` (= `texts[0]`) is the
answer, i.e. the generation target; `question`, `answer`, `qtype`, `id` and `image_id` ride along.
Deterministic: the questions of manifest line i come from `default_rng([seed, i])`.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ernie_vilg.data.shapes import NUMBERS, POSITION_SURFACES, POSITIONS

QTYPES = ("count", "colour_at", "shape_at", "size_at", "shape_of_colour", "colour_of_shape", "where",
          "count_colour")
SIZE_ANSWERS = {"大": "大的", "小": "小的"}


def count_word(n: int) -> str:
    """1 -> 一个, 2 -> 两个 ... (the measure word the shapes captions use)."""
    return f"{NUMBERS[n]}个"


def _cell(obj: dict[str, Any]) -> tuple[int, int]:
    return int(obj["cell"][0]), int(obj["cell"][1])


def _surface(rng: np.random.Generator, cell: tuple[int, int]) -> str:
    forms = POSITION_SURFACES[cell]
    return forms[int(rng.integers(len(forms)))]


def _pick_obj(rng: np.random.Generator, objs: list[dict[str, Any]]) -> dict[str, Any]:
    return objs[int(rng.integers(len(objs)))]


def candidate_questions(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """Every question kind that has an unambiguous answer for this scene: qtype -> (q, a)."""
    objs = list(attrs["objects"])
    out: dict[str, tuple[str, str]] = {}
    if not objs:
        return out
    out["count"] = ("图中有几个物体？", count_word(len(objs)))
    o = _pick_obj(rng, objs)
    out["colour_at"] = (f"{_surface(rng, _cell(o))}的物体是什么颜色？", o["colour"])
    o = _pick_obj(rng, objs)
    out["shape_at"] = (f"{_surface(rng, _cell(o))}的物体是什么形状？", o["shape"])
    o = _pick_obj(rng, objs)
    out["size_at"] = (f"{_surface(rng, _cell(o))}的物体是大的还是小的？", SIZE_ANSWERS[o["size"]])
    colours = Counter(x["colour"] for x in objs)
    shapes = Counter(x["shape"] for x in objs)
    pairs = Counter((x["colour"], x["shape"]) for x in objs)
    unique_colour = [x for x in objs if colours[x["colour"]] == 1]
    if unique_colour:
        o = _pick_obj(rng, unique_colour)
        out["shape_of_colour"] = (f"{o['colour']}的物体是什么形状？", o["shape"])
    unique_shape = [x for x in objs if shapes[x["shape"]] == 1]
    if unique_shape:
        o = _pick_obj(rng, unique_shape)
        out["colour_of_shape"] = (f"{o['shape']}是什么颜色的？", o["colour"])
    unique_pair = [x for x in objs if pairs[(x["colour"], x["shape"])] == 1]
    if unique_pair:
        o = _pick_obj(rng, unique_pair)
        out["where"] = (f"{o['colour']}的{o['shape']}在哪里？", POSITIONS[_cell(o)])
    colour = sorted(colours)[int(rng.integers(len(colours)))]
    out["count_colour"] = (f"图中有几个{colour}的物体？", count_word(colours[colour]))
    return out


def questions_for(attrs: dict[str, Any], rng: np.random.Generator, per_image: int = 3,
                  qtypes: tuple[str, ...] = QTYPES) -> list[tuple[str, str, str]]:
    """Up to `per_image` (qtype, question, answer) of distinct kinds, chosen with `rng`."""
    cands = candidate_questions(attrs, rng)
    kinds = [k for k in qtypes if k in cands]
    order = rng.permutation(len(kinds))[:per_image]
    return [(kinds[i], *cands[kinds[i]]) for i in sorted(order)]


def make_vqa_manifest(
    manifest: str | Path, out: str | Path, per_image: int = 3, seed: int = 0,
    qtypes: tuple[str, ...] = QTYPES, limit: Optional[int] = None,
) -> dict[str, Any]:
    """Stream a shapes manifest and write the VQA manifest `out` (image paths rebased to out's
    folder). Returns counts per question kind."""
    import os

    unknown = [q for q in qtypes if q not in QTYPES]
    if unknown:
        raise ValueError(f"unknown question kinds {unknown} (known: {', '.join(QTYPES)})")
    manifest, out = Path(manifest), Path(out)
    src_dir, dst_dir = manifest.resolve().parent, out.resolve().parent
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    images = skipped = 0
    tmp = out.with_name(out.name + ".tmp")
    with manifest.open("r", encoding="utf-8") as fh, tmp.open("w", encoding="utf-8") as fo:
        for index, line in enumerate(fh):
            if limit is not None and images >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                attrs = obj["attrs"]
                image = obj["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped += 1  # not a shapes line: no ground truth to ask about
                continue
            if not os.path.isabs(image) and src_dir != dst_dir:
                image = os.path.relpath(src_dir / image, dst_dir)
            rng = np.random.default_rng([int(seed), index])
            images += 1
            for k, (qtype, question, answer) in enumerate(questions_for(attrs, rng, per_image, qtypes)):
                rec = {"image": image, "text": answer, "texts": [answer], "id": f"{index}-{k}",
                       "image_id": index, "question": question, "answer": answer, "qtype": qtype}
                fo.write(json.dumps(rec, ensure_ascii=False) + "\n")
                counts[qtype] += 1
    tmp.replace(out)
    return {"out": str(out), "images": images, "questions": sum(counts.values()),
            "skipped_lines": skipped, "per_qtype": dict(sorted(counts.items()))}


def answer_from_attrs(attrs: dict[str, Any], qtype: str, question: str) -> Optional[str]:
    """Re-derive the answer of a question from `attrs` by parsing the question (the test oracle
    and a scorer for generated answers); None if the question does not match its kind."""
    objs = list(attrs["objects"])
    surfaces = {s: cell for cell, forms in POSITION_SURFACES.items() for s in forms}

    def at(suffix: str) -> Optional[dict[str, Any]]:
        if not question.endswith(suffix):
            return None
        cell = surfaces.get(question[: -len(suffix)])
        return next((o for o in objs if _cell(o) == cell), None)

    def unique(pred: Callable[[dict[str, Any]], bool]) -> Optional[dict[str, Any]]:
        hits = [o for o in objs if pred(o)]
        return hits[0] if len(hits) == 1 else None

    if qtype == "count":
        return count_word(len(objs))
    if qtype == "colour_at":
        o = at("的物体是什么颜色？")
        return o and o["colour"]
    if qtype == "shape_at":
        o = at("的物体是什么形状？")
        return o and o["shape"]
    if qtype == "size_at":
        o = at("的物体是大的还是小的？")
        return o and SIZE_ANSWERS[o["size"]]
    if qtype == "shape_of_colour":
        o = unique(lambda x: question == f"{x['colour']}的物体是什么形状？")
        return o and o["shape"]
    if qtype == "colour_of_shape":
        o = unique(lambda x: question == f"{x['shape']}是什么颜色的？")
        return o and o["colour"]
    if qtype == "where":
        o = unique(lambda x: question == f"{x['colour']}的{x['shape']}在哪里？")
        return o and POSITIONS[_cell(o)]
    if qtype == "count_colour":
        n = sum(1 for x in objs if question == f"图中有几个{x['colour']}的物体？")
        return count_word(n) if n else None
    return None
