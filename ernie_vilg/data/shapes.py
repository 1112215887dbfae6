"""The synthetic "shapes" world: deterministic image-caption pairs with ground truth.

Every image shows 1..3 flat-coloured objects on a plain dark background, each in its own cell of
a 3x3 grid. An object has a shape (圆形 正方形 三角形 十字形), a colour (红色 黄色 绿色 青色 蓝色
紫色 白色: saturated and far apart so that they survive a lossy VQ tokenizer), a size (大 = 0.8
of a cell, 小 = 0.58) and a position (the cell: 左上 上方 右上 / 左边 中间 右边 / 左下 下方 右下). Each image gets five Chinese paraphrases from six caption templates (one of them states a
relation such as "它的左边" between two objects), like the five references of AIC-ICC.

Everything is a pure function of the seed: item `i` of split `s` draws from
`np.random.default_rng([seed, split_id, i])`, so an item does not depend on how many items the
other splits have, and PNGs are written by PIL with fixed settings (no anti-aliasing, no metadata)
so the same seed gives byte-identical files.

The judge that scores generated images against a caption lives in `shapes_judge.py`; the caption
parser (`parse_caption`) lives here because it is the inverse of `caption_scene`.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- vocabulary

# Chinese name -> short id (the id is only for code and file names; captions use the Chinese).
SHAPES: dict[str, str] = {
    "圆形": "circle",
    "正方形": "square",
    "三角形": "triangle",
    "十字形": "cross",
    # "菱形" (diamond) was tried and dropped: a blurred small cross and a diamond look alike
}

# Saturated colours whose directions from the black background are >= 35 degrees apart in RGB
# (and >= 45 apart in CIE Lab), so the judge tells them apart at any brightness.
COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (235, 30, 30),
    "黄色": (240, 220, 20),
    "绿色": (30, 190, 40),
    "青色": (0, 190, 210),
    "蓝色": (30, 60, 255),
    "紫色": (210, 40, 200),
    "白色": (240, 240, 240),
}

SIZES: tuple[str, str] = ("大", "小")
# Object extent (side of its square bounding box) as a fraction of a cell (a third of the image
# side): a small object is still ~12 px at 64 px, so it stays recognisable after blur / an f=8
# autoencoder, and two neighbours keep a gap of >= 2 * CELL_MARGIN cells (4 px at 64 px) so
# same-coloured neighbours do not merge after blur or JPEG.
SIZE_FRACTION: dict[str, float] = {"大": 0.8, "小": 0.58}
CELL_MARGIN = 0.1

# Canonical position name of each cell (row, col) and the surface forms captions use for it.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "左上", (0, 1): "上方", (0, 2): "右上",
    (1, 0): "左边", (1, 1): "中间", (1, 2): "右边",
    (2, 0): "左下", (2, 1): "下方", (2, 2): "右下",
}
POSITION_SURFACES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("左上角", "左上方"), (0, 1): ("上方", "正上方", "上面"), (0, 2): ("右上角", "右上方"),
    (1, 0): ("左边", "左侧"), (1, 1): ("中间", "正中间", "中央"), (1, 2): ("右边", "右侧"),
    (2, 0): ("左下角", "左下方"), (2, 1): ("下方", "正下方", "下面"), (2, 2): ("右下角", "右下方"),
}
# Relation of an object to an anchor object: (d_row sign, d_col sign); surface forms.
RELATIONS: dict[str, tuple[int, int]] = {"左边": (0, -1), "右边": (0, 1), "上面": (-1, 0), "下面": (1, 0)}
RELATION_SURFACES: dict[str, tuple[str, ...]] = {
    "左边": ("左边", "左侧"), "右边": ("右边", "右侧"), "上面": ("上面", "上方"), "下面": ("下面", "下方"),
}
NUMBERS = ("零", "一", "两", "三", "四", "五", "六", "七", "八", "九")

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"黑色": (0, 0, 0), "深灰色": (40, 40, 40)}

TEMPLATES: tuple[str, ...] = ("t1", "t2", "t3", "t4", "t5", "t6")
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


# ----------------------------------------------------------------------------- scenes

@dataclass
class ShapeObject:
    shape: str  # key of SHAPES
    colour: str  # key of COLOURS
    size: str  # "大" or "小"
    row: int
    col: int
    # centre offset from the cell centre, in cells (jitter so that layouts are not pixel-identical)
    dx: float = 0.0
    dy: float = 0.0

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    def to_attrs(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "cell": [self.row, self.col],
            "position": POSITIONS[(self.row, self.col)],
        }


@dataclass
class Scene:
    objects: list[ShapeObject]  # in reading order (row-major by cell)
    background: str = "黑色"

    def to_attrs(self) -> dict[str, Any]:
        """Ground truth as stored in the manifest's `attrs` field (stable key order)."""
        return {
            "count": len(self.objects),
            "objects": [o.to_attrs() for o in self.objects],
            "background": self.background,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Scene":
        objs = [
            ShapeObject(o["shape"], o["colour"], o["size"], int(o["cell"][0]), int(o["cell"][1]))
            for o in attrs["objects"]
        ]
        objs.sort(key=lambda o: o.cell)
        return cls(objs, attrs.get("background", "黑色"))


def sample_scene(
    rng: np.random.Generator,
    min_objects: int = 1,
    max_objects: int = 3,
    shapes: Optional[Sequence[str]] = None,
    colours: Optional[Sequence[str]] = None,
    jitter: bool = True,
    background: str = "黑色",
) -> Scene:
    """Draw a scene: a uniform object count, distinct cells, uniform shape / colour / size."""
    shapes = list(shapes or SHAPES)
    colours = list(colours or COLOURS)
    if not 1 <= min_objects <= max_objects <= 9:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}")
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; known: {list(SHAPES)}")
    for c in colours:
        if c not in COLOURS:
            raise ValueError(f"unknown colour {c!r}; known: {list(COLOURS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; known: {list(BACKGROUNDS)}")
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    objs = []
    for c in cells:
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = colours[int(rng.integers(len(colours)))]
        size = SIZES[int(rng.integers(2))]
        # the object stays inside its cell with CELL_MARGIN to spare on every side
        slack = max(0.0, (1.0 - SIZE_FRACTION[size]) / 2 - CELL_MARGIN)
        dx, dy = (rng.uniform(-slack, slack, size=2) if jitter else (0.0, 0.0))
        objs.append(ShapeObject(shape, colour, size, c // 3, c % 3, round(float(dx), 4), round(float(dy), 4)))
    return Scene(objs, background)


# ----------------------------------------------------------------------------- rendering

CROSS_ARM = 1.0 / 3.0  # arm width of the cross as a fraction of its box


def shape_polygons(
    shape: str, x0: float, y0: float, s: float, arm: float = CROSS_ARM
) -> list[list[tuple[float, float]]]:
    """The shape inside the square box [x0, x0+s] x [y0, y0+s] as polygons (a circle as a 64-gon).

    Every shape touches all four sides of its box, so the bounding box is the size. `arm` is the
    cross's arm width (a fraction of the box); the judge also matches wider arms because pixel
    rounding and blur widen the arms of a small cross.
    """
    if shape == "正方形":
        return [[(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]]
    if shape == "三角形":  # apex up: its centroid sits low in the box, unlike the diamond's
        return [[(x0 + s / 2, y0), (x0 + s, y0 + s), (x0, y0 + s)]]
    if shape == "十字形":
        lo, hi = (1 - arm) / 2 * s, (1 + arm) / 2 * s
        a, b = x0 + lo, x0 + hi
        c, d = y0 + lo, y0 + hi
        return [[(a, y0), (b, y0), (b, y0 + s), (a, y0 + s)], [(x0, c), (x0 + s, c), (x0 + s, d), (x0, d)]]
    if shape == "圆形":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        r = s / 2
        return [[(x0 + r + r * float(np.cos(a)), y0 + r + r * float(np.sin(a))) for a in t]]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, s: float, fill: Any) -> None:
    """Rasterise a shape without anti-aliasing (pixel centres at integer + 0.5)."""
    for poly in shape_polygons(shape, x0, y0, s):
        # PIL fills pixels whose integer coordinates lie inside; shifting by -0.5 samples centres
        draw.polygon([(x - 0.5, y - 0.5) for x, y in poly], fill=fill)


def object_box(obj: ShapeObject, size: int) -> tuple[float, float, float]:
    """(x0, y0, side) of the object's bounding box in pixels of a size x size image."""
    cell = size / 3.0
    s = SIZE_FRACTION[obj.size] * cell
    cx = (obj.col + 0.5 + obj.dx) * cell
    cy = (obj.row + 0.5 + obj.dy) * cell
    return cx - s / 2, cy - s / 2, s


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as a size x size RGB image: pure palette colours on a plain background."""
    if size < 12:
        raise ValueError(f"image size {size} is too small for a 3x3 grid of shapes")
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, s = object_box(obj, size)
        draw_shape(draw, obj.shape, x0, y0, s, COLOURS[obj.colour])
    return img


# ----------------------------------------------------------------------------- captions

def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _relation(anchor: tuple[int, int], cell: tuple[int, int]) -> Optional[str]:
    """The relation word that is true of `cell` w.r.t. `anchor` (same row or column), if any."""
    (ar, ac), (r, c) = anchor, cell
    if r == ar and c != ac:
        return "左边" if c < ac else "右边"
    if c == ac and r != ar:
        return "上面" if r < ar else "下面"
    return None


def caption_with_template(scene: Scene, template: str, rng: np.random.Generator) -> str:
    """One caption of `scene` in one template; `rng` picks synonyms (and the t6 anchor)."""
    objs = scene.objects
    n = len(objs)
    if n == 0:
        raise ValueError("a scene needs at least one object")
    pos = [_pick(rng, POSITION_SURFACES[o.cell]) for o in objs]
    # two noun-phrase orders; "大红色" is avoided on purpose (it means "bright red" in Chinese)
    np_a = [f"一个{o.size}的{o.colour}{o.shape}" for o in objs]  # 一个大的红色圆形
    np_b = [f"一个{o.colour}的{o.size}{o.shape}" for o in objs]  # 一个红色的大圆形
    np_c = [f"{o.colour}{o.size}{o.shape}" for o in objs]  # 红色大圆形
    num = NUMBERS[n] if n < len(NUMBERS) else str(n)
    if template == "t1":  # 左上角有一个大的红色圆形，中间有一个小的蓝色正方形。
        return "，".join(f"{p}有{a}" for p, a in zip(pos, np_a)) + "。"
    if template == "t2":  # 图中有两个图形：左上角是一个红色的大圆形，中间是一个蓝色的小正方形。
        head = "图中只有一个图形" if n == 1 else f"图中有{num}个图形"
        return head + "：" + "，".join(f"{p}是{b}" for p, b in zip(pos, np_b)) + "。"
    if template == "t3":  # 一个大的红色圆形位于画面的左上角，...
        return "，".join(f"{a}位于画面的{p}" for p, a in zip(pos, np_a)) + "。"
    if template == "t4":  # 画面左上角画着一个红色的大圆形，...
        return "，".join(f"画面{p}画着{b}" for p, b in zip(pos, np_b)) + "。"
    if template == "t5":  # 这张图片里有两个物体，分别是左上角的红色大圆形和中间的蓝色小正方形。
        parts = [f"{p}的{c}" for p, c in zip(pos, np_c)]
        if n == 1:
            return f"这张图片里只有一个物体，是{parts[0]}。"
        listed = "、".join(parts[:-1]) + "和" + parts[-1]
        return f"这张图片里有{num}个物体，分别是{listed}。"
    if template == "t6":  # 中间有一个大的红色圆形，它的左边有一个小的蓝色正方形，右下角还有...
        k = int(rng.integers(n))  # the anchor, named first with an absolute position
        # relational clauses follow the anchor directly so that "它" reads unambiguously
        related, others = [], []
        for i, o in enumerate(objs):
            if i == k:
                continue
            rel = _relation(objs[k].cell, o.cell)
            if rel is not None:
                related.append(f"它的{_pick(rng, RELATION_SURFACES[rel])}有{np_a[i]}")
            else:
                others.append(f"{pos[i]}还有{np_a[i]}")
        return "，".join([f"{pos[k]}有{np_a[k]}"] + related + others) + "。"
    raise ValueError(f"unknown caption template {template!r}; known: {TEMPLATES}")


def caption_scene(scene: Scene, rng: np.random.Generator, num_texts: int = 5) -> list[str]:
    """`num_texts` distinct paraphrases of the scene, from distinct templates in a random order.

    A one-object scene has no relation to state, so t6 would equal t1: it is left out there.
    """
    pool = list(TEMPLATES) if len(scene.objects) > 1 else [t for t in TEMPLATES if t != "t6"]
    if not 1 <= num_texts <= len(pool):
        raise ValueError(f"num_texts must be in 1..{len(pool)} for this scene, got {num_texts}")
    chosen = [pool[int(i)] for i in rng.permutation(len(pool))[:num_texts]]
    texts = [caption_with_template(scene, t, rng) for t in chosen]
    assert len(set(texts)) == len(texts), texts  # templates differ structurally
    return texts


# ----------------------------------------------------------------------------- parsing

def _alt(words: Sequence[str]) -> str:
    # longest first so that e.g. 正上方 wins over 上方
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_SURFACE_TO_CELL = {w: cell for cell, ws in POSITION_SURFACES.items() for w in ws}
_SURFACE_TO_REL = {w: rel for rel, ws in RELATION_SURFACES.items() for w in ws}
_POS = f"(?P<p>{_alt(list(_SURFACE_TO_CELL))})"
_REL = f"(?P<rel>{_alt(list(_SURFACE_TO_REL))})"
_OBJ = (
    f"(?:一个)?(?:(?P<s1>大|小)的)?(?P<c>{_alt(list(COLOURS))})的?"
    f"(?P<s2>大|小)?(?P<h>{_alt(list(SHAPES))})"
)
_NUM = f"(?P<n>{_alt(NUMBERS[1:])}|[1-9])"
_CLAUSES = [
    ("rel", re.compile(f"它的{_REL}(?:还)?(?:有|是){_OBJ}")),
    ("abs", re.compile(f"(?:在)?(?:画面的?|图片的?|图中的?)?{_POS}(?:还)?(?:有|是|画着|可以看到){_OBJ}")),
    ("abs", re.compile(f"{_OBJ}位于(?:画面|图片|图中)?的?{_POS}")),
    ("abs", re.compile(f"(?:分别是|是)?{_POS}的{_OBJ}")),
    ("count", re.compile(f"(?:图中|画面中|这张图片里|这张图里)(?:只|一共|共)?有{_NUM}个(?:图形|物体)")),
]
_SPLIT = re.compile(r"[，,。．.：:；;、和！!\s]+")


def parse_caption(text: str) -> dict[str, Any]:
    """Parse a caption of any template back to claimed attributes.

    Returns `{"count": N, "objects": [{"shape", "colour", "size", "cells", "position",
    "relation"}, ...]}` where `cells` lists the cells the text allows for the object (one cell for
    an absolute position; for "它的左边" every cell left of the anchor in its row), `position` is
    the canonical cell name or None, `relation` is None or `{"anchor": index, "relation": "左边"}`,
    `size` may be None if the text does not say. `count` is the stated number of objects if the
    text states one, else the number of objects described.

    Raises ValueError naming the text if any part of it is not understood.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"cannot parse shapes caption {text!r}: empty")
    objects: list[dict[str, Any]] = []
    stated_count: Optional[int] = None
    anchor: Optional[int] = None  # "它" refers to the first object with an absolute position
    for piece in _SPLIT.split(text.strip()):
        if not piece:
            continue
        for kind, rx in _CLAUSES:
            m = rx.fullmatch(piece)
            if m:
                break
        else:
            raise ValueError(f"cannot parse shapes caption {text!r}: unrecognised part {piece!r}")
        if kind == "count":
            w = m.group("n")
            stated_count = int(w) if w.isdigit() else NUMBERS.index(w)
            continue
        s1, s2 = m.group("s1"), m.group("s2")
        if s1 and s2:
            raise ValueError(f"cannot parse shapes caption {text!r}: two sizes in {piece!r}")
        obj: dict[str, Any] = {
            "shape": m.group("h"), "colour": m.group("c"), "size": s1 or s2 or None,
            "cells": [], "position": None, "relation": None,
        }
        if kind == "abs":
            cell = _SURFACE_TO_CELL[m.group("p")]
            obj["cells"] = [list(cell)]
            obj["position"] = POSITIONS[cell]
            if anchor is None:
                anchor = len(objects)
        else:
            if anchor is None:
                raise ValueError(f"cannot parse shapes caption {text!r}: {piece!r} has no object before it")
            rel = _SURFACE_TO_REL[m.group("rel")]
            dr, dc = RELATIONS[rel]
            ar, ac = objects[anchor]["cells"][0]
            obj["cells"] = [
                [r, c] for r in range(3) for c in range(3)
                if (r, c) != (ar, ac) and (dr == 0 and r == ar and (c - ac) * dc > 0
                                          or dc == 0 and c == ac and (r - ar) * dr > 0)
            ]
            obj["relation"] = {"anchor": anchor, "relation": rel}
        objects.append(obj)
    if not objects:
        raise ValueError(f"cannot parse shapes caption {text!r}: it describes no object")
    return {"count": stated_count if stated_count is not None else len(objects), "objects": objects}


def claims_hold(claims: dict[str, Any], attrs: dict[str, Any]) -> bool:
    """Symbolic truth (no pixels) of parsed claims about a ground-truth scene: the counts agree and
    every claimed object is some true object (shape, colour, size if stated) in an allowed cell."""
    if claims["count"] != attrs["count"] or len(claims["objects"]) != attrs["count"]:
        return False
    return all(
        any(
            o["shape"] == c["shape"] and o["colour"] == c["colour"]
            and (c.get("size") is None or o["size"] == c["size"]) and list(o["cell"]) in c["cells"]
            for o in attrs["objects"]
        )
        for c in claims["objects"]
    )


PERTURBATIONS = ("colour", "shape", "position", "size", "count")


def perturb_scene(attrs: dict[str, Any], kind: str, rng: np.random.Generator) -> Scene:
    """The scene of `attrs` with exactly one attribute changed: one object's colour, shape, size
    or cell (to an empty one), or the count (drop an object, or add one in an empty cell).

    Used to test that the judge rejects wrong captions; also usable as hard negatives.
    """
    objs = [dict(o) for o in attrs["objects"]]
    k = int(rng.integers(len(objs)))
    free = [c for c in POSITIONS if c not in {tuple(o["cell"]) for o in objs}]
    if kind == "colour":
        objs[k]["colour"] = str(rng.choice([c for c in COLOURS if c != objs[k]["colour"]]))
    elif kind == "shape":
        objs[k]["shape"] = str(rng.choice([s for s in SHAPES if s != objs[k]["shape"]]))
    elif kind == "size":
        objs[k]["size"] = "小" if objs[k]["size"] == "大" else "大"
    elif kind == "position":
        objs[k]["cell"] = list(free[int(rng.integers(len(free)))])
    elif kind == "count":
        if len(objs) > 1 and (not free or rng.random() < 0.5):
            objs.pop(k)
        else:
            objs.append({"shape": str(rng.choice(list(SHAPES))), "colour": str(rng.choice(list(COLOURS))),
                         "size": SIZES[int(rng.integers(2))], "cell": list(free[int(rng.integers(len(free)))])})
    else:
        raise ValueError(f"unknown perturbation {kind!r}; known: {PERTURBATIONS}")
    return Scene.from_attrs({"objects": objs, "background": attrs.get("background", "黑色")})


# ----------------------------------------------------------------------------- dataset files

def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding with fixed settings and no metadata, so equal images give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one item: independent of every other item and of the split sizes."""
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def make_item(
    seed: int,
    split: str,
    index: int,
    size: int = 64,
    num_texts: int = 5,
    text_template: Optional[str] = None,
    **scene_kwargs: Any,
) -> tuple[Image.Image, dict[str, Any]]:
    """One (image, manifest record without the image path) pair, a pure function of its args.

    `text_template` (e.g. "t1") makes `text` always that template (for small models that should
    learn one phrasing); by default `text` is one of `texts` chosen by the seed.
    """
    rng = item_rng(seed, split, index)
    scene = sample_scene(rng, **scene_kwargs)
    texts = caption_scene(scene, rng, num_texts=num_texts)
    if text_template is None:
        text = texts[int(rng.integers(len(texts)))]
    else:
        text = caption_with_template(scene, text_template, rng)
        if text not in texts:
            texts = [text] + texts[:-1]
    return render_scene(scene, size), {"text": text, "texts": texts, "attrs": scene.to_attrs()}


def write_shapes_dataset(
    out: str | Path,
    num_train: int,
    num_val: int,
    num_test: int,
    size: int = 64,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 3,
    shapes: Optional[Sequence[str]] = None,
    colours: Optional[Sequence[str]] = None,
    background: str = "黑色",
    jitter: bool = True,
    num_texts: int = 5,
    text_template: Optional[str] = None,
    progress: bool = False,
) -> dict[str, int]:
    """Write `OUT/images/{split}_{i:06d}.png`, `OUT/{train,val,test}.jsonl` and `OUT/shapes.json`.

    Manifest lines: `{"image": "images/train_000123.png", "text": ..., "texts": [...],
    "attrs": {...}}` (paths relative to OUT, UTF-8, stable key order). `shapes.json` records the
    generator settings and palette. Returns the number of items per split.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scene_kwargs = dict(min_objects=min_objects, max_objects=max_objects, shapes=shapes,
                        colours=colours, jitter=jitter, background=background)
    counts = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
    total = sum(counts.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="shapes", unit="img")
    for split, n in counts.items():
        lines = []
        for i in range(n):
            img, rec = make_item(seed, split, i, size=size, num_texts=num_texts,
                                 text_template=text_template, **scene_kwargs)
            rel = f"images/{split}_{i:06d}.png"
            _atomic_write(out / rel, png_bytes(img))
            lines.append(json.dumps({"image": rel, **rec}, ensure_ascii=False))
            if bar is not None:
                bar.update(1)
        _atomic_write(out / f"{split}.jsonl", "".join(l + "\n" for l in lines).encode("utf-8"))
    if bar is not None:
        bar.close()
    meta = {
        "generator": "ernie_vilg.data.shapes",
        "seed": int(seed), "size": int(size), "counts": counts,
        "min_objects": min_objects, "max_objects": max_objects,
        "shapes": list(shapes or SHAPES), "colours": {c: list(COLOURS[c]) for c in (colours or COLOURS)},
        "background": background, "background_rgb": list(BACKGROUNDS[background]),
        "size_fraction": SIZE_FRACTION, "jitter": jitter, "num_texts": num_texts,
        "text_template": text_template, "templates": list(TEMPLATES),
    }
    _atomic_write(out / "shapes.json", (json.dumps(meta, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    return counts
