"""The judge of the shapes world: does an image show what a caption says? Pixels only, no model.

This is the objective text-to-image metric of the quickstart. It must be robust to generated
images (blurry, noisy VQ decodes), so every decision is relative to the image size and made on
whole connected components rather than single pixels.

Analysis (`analyse_image`):
1. Background colour = median of the image border (objects never touch it). Blur and lossy
   decoders mix an object's colour with the background, so each pixel is read as
   `bg + alpha * (colour - bg)`: its colour label is the palette colour whose direction from the
   background is closest (largest cosine, which ignores brightness), and it is foreground if
   alpha >= 0.5 along that direction and the cosine is >= `min_cosine` (the palette colours are
   >= 35 degrees apart).
2. Foreground pixels form 4-connected components; components smaller than `min_area` (a fraction
   of a grid cell's area) are noise and dropped. A component in which two palette colours each
   hold a large share (two touching objects) is split by colour.
3. Each component gets: `colour` = majority palette colour of its interior pixels (the eroded
   mask, so blurred rims do not vote); `shape` = the shape whose rendering, blurred by the
   image's edge blur (`estimate_blur`, snapped to `BLUR_LEVELS`) and thresholded at half
   intensity as the mask was, then stretched to the component's bounding box, has the highest
   soft IoU with the (hole-filled) mask; `size` = 大 if the longer bounding-box side is >=
   `LARGE_THRESHOLD` cells (the midpoint between the small and large extents), else 小;
   `cell` = the grid cell of the bounding-box centre.

Decisions for one claimed object (from `parse_caption` or from ground-truth `attrs`), where its
"located components" are the components whose cell is one the claim allows (one cell, or for a
relation such as 它的左边 every cell on that side of the anchor):
- `position_ok`: some located component has the claimed colour or the claimed shape (something
  matching the description is where the text says; judged apart from whether it is exactly right).
- The "match" is the located component agreeing best with the claim (colour, shape, size agreeing
  count; larger area breaks ties). No located component -> every flag below is False.
- `colour_ok`: the match has the claimed colour.
- `shape_ok`: the match has the claimed shape.
- `size_ok`: the match has the claimed size (True when the claim states no size).
Image level: `count_ok` = the number of components equals the claimed count; `colour_ok`,
`shape_ok`, `position_ok`, `size_ok` = true for every claimed object; `all_ok` = all of these and
`count_ok`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Optional, Sequence, Union

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from ernie_vilg.data.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    parse_caption,
    shape_polygons,
)

ImageLike = Union[Image.Image, np.ndarray]
LARGE_THRESHOLD = (SIZE_FRACTION["大"] + SIZE_FRACTION["小"]) / 2

_PALETTE_NAMES = list(COLOURS)


_PALETTE_RGB = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """PIL image or array (HxWx3 / 3xHxW, uint8 or float in [0, 1] or [0, 255]) -> HxWx3 uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4) and arr.shape[0] in (3, 4):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got an array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


@dataclass
class Component:
    """One detected object."""

    colour: str
    shape: str
    size: str
    cell: tuple[int, int]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    shape_scores: dict[str, float] = field(default_factory=dict)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def to_dict(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "cell": list(self.cell),
                "position": self.position, "bbox": list(self.bbox), "area": self.area}


# Blur levels (in image pixels) at which each shape is also matched: a blurred or lossy decode
# rounds corners, and a 10-pixel square with rounded corners must still beat the circle.
BLUR_LEVELS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)


# Variants matched for each shape (keyword arguments of `shape_polygons`).
SHAPE_VARIANTS: dict[str, tuple[dict[str, float], ...]] = {
    name: (({"arm": 1 / 3}, {"arm": 0.42}) if name == "十字形" else ({},)) for name in SHAPES
}


@lru_cache(maxsize=16384)
def _shape_template(
    shape: str, w: int, h: int, sigma: float = 0.0, variant: int = 0, ss: int = 8
) -> np.ndarray:
    """Soft occupancy (h x w, in [0, 1]) of the shape as it looks after a Gaussian blur of
    `sigma` image pixels and thresholding at half intensity, cropped and stretched to w x h."""
    side = (w + h) / 2.0  # the object's size in image pixels sets how much the blur rounds it
    pad = int(np.ceil(3 * sigma)) + 1
    n = int(round((side + 2 * pad) * ss))
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in shape_polygons(shape, pad * ss, pad * ss, side * ss, **SHAPE_VARIANTS[shape][variant]):
        draw.polygon([(x - 0.5, y - 0.5) for x, y in poly], fill=255)
    big = np.asarray(canvas, dtype=np.float32) / 255.0
    if sigma > 0:
        big = cv2.GaussianBlur(big, (0, 0), sigma * ss)
    on = big >= 0.5
    if not on.any():  # a tiny object blurred away entirely
        return np.zeros((h, w), dtype=np.float32)
    ys, xs = np.nonzero(on)
    crop = on[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32)
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)


def shape_scores(mask: np.ndarray, sigma: float) -> dict[str, float]:
    """Soft IoU of a binary mask (cropped to its bounding box) with each shape at blur `sigma`."""
    h, w = mask.shape
    m = mask.astype(np.float32)
    scores = {}
    for shape in SHAPES:
        best = 0.0
        for v in range(len(SHAPE_VARIANTS[shape])):
            t = _shape_template(shape, int(w), int(h), sigma, v)
            best = max(best, float(np.minimum(m, t).sum() / max(np.maximum(m, t).sum(), 1e-6)))
        scores[shape] = best
    return scores


def estimate_blur(alpha: np.ndarray, fg: np.ndarray) -> float:
    """The blur (Gaussian sigma in pixels) of the object edges, snapped to `BLUR_LEVELS`.

    A step edge blurred by sigma has its 15%..85% ramp 2.07 sigma wide, so the number of
    part-covered pixels near the objects divided by the objects' perimeter (in pixels) estimates
    it. A clean render has no part-covered pixels and gets sigma 0.
    """
    if not fg.any():
        return 0.0
    near = ndimage.binary_dilation(fg, iterations=3)
    mixed = near & (alpha > 0.15) & (alpha < 0.85)
    perimeter = (fg & ~ndimage.binary_erosion(fg)).sum()
    sigma = float(mixed.sum()) / (2.07 * max(int(perimeter), 1))
    return min(BLUR_LEVELS, key=lambda lv: abs(lv - sigma))


def classify_shape(mask: np.ndarray, sigma: float = 0.0) -> tuple[str, dict[str, float]]:
    """Best shape for a binary mask cropped to its bounding box: the highest soft IoU with the
    shape's template at blur `sigma`."""
    scores = shape_scores(mask, sigma)
    return max(scores, key=scores.get), scores


def analyse_image(
    image: ImageLike,
    background_rgb: Optional[Sequence[int]] = None,
    min_area: float = 0.06,
    min_cosine: float = 0.8,
) -> list[Component]:
    """Detect the objects of a shapes-world image (any size). See the module docstring.

    `min_area` is a fraction of one grid cell's area (the smallest object, a small triangle,
    covers ~0.125 of a cell). `background_rgb` defaults to the median colour of the border.
    """
    rgb = to_rgb_array(image).astype(np.float32)
    H, W = rgb.shape[:2]
    if background_rgb is None:
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)
        bg = np.median(border, axis=0)
    else:
        bg = np.asarray(background_rgb, dtype=np.float32)
    # A blurred or decoded pixel is (close to) a mix bg + alpha * (colour - bg): its direction from
    # the background names the colour whatever its brightness, and alpha says how much object
    # covers it. alpha >= 0.5 is the object's extent, the same cut the shape templates use.
    dirs = _PALETTE_RGB - bg  # K x 3
    norms = np.linalg.norm(dirs, axis=1)
    diff = rgb - bg
    dlen = np.linalg.norm(diff, axis=-1)
    proj = diff @ dirs.T  # H x W x K
    cos = proj / (dlen[..., None] * norms + 1e-6)
    labels = cos.argmax(axis=-1)
    alpha = np.take_along_axis(proj, labels[..., None], axis=-1)[..., 0] / (norms[labels] ** 2 + 1e-6)
    fg = (alpha >= 0.5) & (cos.max(axis=-1) >= min_cosine)

    cell_w, cell_h = W / 3.0, H / 3.0
    min_px = max(2.0, min_area * cell_w * cell_h)
    comp_ids, n = ndimage.label(fg)  # 4-connectivity: thin diagonal bridges do not merge objects
    pieces: list[np.ndarray] = []
    for sl_idx, sl in enumerate(ndimage.find_objects(comp_ids), start=1):
        if sl is None:
            continue
        mask = comp_ids[sl] == sl_idx
        area = int(mask.sum())
        if area < min_px:
            continue
        counts = np.bincount(labels[sl][mask], minlength=len(_PALETTE_NAMES))
        major = [k for k in range(len(counts)) if counts[k] >= max(min_px, 0.25 * area)]
        if len(major) <= 1:
            pieces.append(_full_mask(sl, mask, H, W))
            continue
        # two objects of different colours touch: split by colour, keep big connected pieces
        for k in major:
            sub, m = ndimage.label(mask & (labels[sl] == k))
            for j in range(1, m + 1):
                part = sub == j
                if part.sum() >= min_px:
                    pieces.append(_full_mask(sl, part, H, W))

    crops = []
    for full in pieces:
        ys, xs = np.nonzero(full)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        crops.append(ndimage.binary_fill_holes(full[y0:y1, x0:x1]))
    sigma = estimate_blur(alpha, fg)

    comps = []
    for full, crop in zip(pieces, crops):
        ys, xs = np.nonzero(full)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        # interior pixels vote for the colour: blurred rims mix with the background
        core = ndimage.binary_erosion(full[y0:y1, x0:x1])
        if core.sum() < 0.2 * crop.sum():
            core = full[y0:y1, x0:x1]
        votes = np.bincount(labels[y0:y1, x0:x1][core], minlength=len(_PALETTE_NAMES))
        colour = _PALETTE_NAMES[int(votes.argmax())]
        shape, scores = classify_shape(crop, sigma)
        # a sharp render covers one pixel more than the nominal side (PIL fills edge pixels)
        edge = 1.0 if sigma == 0 else 0.0
        extent = max((x1 - x0 - edge) / cell_w, (y1 - y0 - edge) / cell_h)
        size = "大" if extent >= LARGE_THRESHOLD else "小"
        col = min(2, max(0, int(((x0 + x1) / 2.0) / cell_w)))
        row = min(2, max(0, int(((y0 + y1) / 2.0) / cell_h)))
        comps.append(Component(colour, shape, size, (row, col), (x0, y0, x1, y1), int(crop.sum()), scores))
    comps.sort(key=lambda c: (c.cell, -c.area))
    return comps


def _full_mask(sl: tuple[slice, slice], mask: np.ndarray, H: int, W: int) -> np.ndarray:
    full = np.zeros((H, W), dtype=bool)
    full[sl] = mask
    return full


# ----------------------------------------------------------------------------- verdicts

@dataclass
class ObjectVerdict:
    claim: dict[str, Any]
    colour_ok: bool
    shape_ok: bool
    position_ok: bool
    size_ok: bool
    match: Optional[Component] = None

    @property
    def all_ok(self) -> bool:
        return self.colour_ok and self.shape_ok and self.position_ok and self.size_ok


@dataclass
class JudgeResult:
    """Per-object and per-image verdicts; see the module docstring for the exact definitions."""

    objects: list[ObjectVerdict]
    count_ok: bool
    claimed_count: int
    detected_count: int
    components: list[Component]

    @property
    def colour_ok(self) -> bool:
        return all(o.colour_ok for o in self.objects)

    @property
    def shape_ok(self) -> bool:
        return all(o.shape_ok for o in self.objects)

    @property
    def position_ok(self) -> bool:
        return all(o.position_ok for o in self.objects)

    @property
    def size_ok(self) -> bool:
        return all(o.size_ok for o in self.objects)

    @property
    def all_ok(self) -> bool:
        return self.count_ok and all(o.all_ok for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {
            "all_ok": self.all_ok, "colour_ok": self.colour_ok, "shape_ok": self.shape_ok,
            "position_ok": self.position_ok, "size_ok": self.size_ok, "count_ok": self.count_ok,
            "claimed_count": self.claimed_count, "detected_count": self.detected_count,
            "objects": [
                {"colour_ok": o.colour_ok, "shape_ok": o.shape_ok, "position_ok": o.position_ok,
                 "size_ok": o.size_ok, "match": o.match.to_dict() if o.match else None}
                for o in self.objects
            ],
            "components": [c.to_dict() for c in self.components],
        }


def _claims(attrs_or_caption: Union[str, dict[str, Any]]) -> dict[str, Any]:
    """Normalise a caption, parsed claims or ground-truth attrs to `{"count", "objects"}` with cells."""
    claims = parse_caption(attrs_or_caption) if isinstance(attrs_or_caption, str) else attrs_or_caption
    objs = []
    for o in claims["objects"]:
        cells = o.get("cells")
        if cells is None:
            cells = [o["cell"]]
        objs.append({"shape": o["shape"], "colour": o["colour"], "size": o.get("size"),
                     "cells": [tuple(int(v) for v in c) for c in cells]})
    return {"count": int(claims.get("count", len(objs))), "objects": objs}


def judge_image(
    image: ImageLike,
    attrs_or_caption: Union[str, dict[str, Any]],
    components: Optional[list[Component]] = None,
    **analyse_kwargs: Any,
) -> JudgeResult:
    """Judge whether `image` shows what the caption (or attrs / parsed claims) says.

    Raises ValueError (from `parse_caption`) for a caption outside the shapes grammar. Pass
    `components` (from `analyse_image`) to judge several captions of one image without
    re-analysing it.
    """
    claims = _claims(attrs_or_caption)
    comps = components if components is not None else analyse_image(image, **analyse_kwargs)
    verdicts = []
    for claim in claims["objects"]:
        located = [c for c in comps if c.cell in claim["cells"]]
        if not located:
            verdicts.append(ObjectVerdict(claim, False, False, False, False, None))
            continue

        def agreement(c: Component) -> tuple[int, int]:
            hits = (c.colour == claim["colour"]) + (c.shape == claim["shape"])
            hits += claim["size"] is not None and c.size == claim["size"]
            return (int(hits), c.area)

        match = max(located, key=agreement)
        verdicts.append(ObjectVerdict(
            claim,
            colour_ok=match.colour == claim["colour"],
            shape_ok=match.shape == claim["shape"],
            position_ok=any(c.colour == claim["colour"] or c.shape == claim["shape"] for c in located),
            size_ok=claim["size"] is None or match.size == claim["size"],
            match=match,
        ))
    return JudgeResult(verdicts, len(comps) == claims["count"], claims["count"], len(comps), comps)


def judge_accuracy(results: Iterable[JudgeResult]) -> dict[str, float]:
    """Image-level accuracy per attribute (`shape`, `colour`, `position`, `size`, `count`, `all`),
    object-level accuracy (`object_shape`, `object_colour`, `object_position`, `object_size`) and
    the number of images `n`."""
    results = list(results)
    n = len(results)
    if n == 0:
        return {"n": 0}
    out: dict[str, float] = {"n": n}
    for attr in ("shape", "colour", "position", "size", "count", "all"):
        out[attr] = sum(getattr(r, f"{attr}_ok") for r in results) / n
    objs = [o for r in results for o in r.objects]
    for attr in ("shape", "colour", "position", "size"):
        out[f"object_{attr}"] = sum(getattr(o, f"{attr}_ok") for o in objs) / max(len(objs), 1)
    return out


def judge_pairs(
    images: Sequence[ImageLike], claims: Sequence[Union[str, dict[str, Any]]], **analyse_kwargs: Any
) -> tuple[list[JudgeResult], dict[str, float]]:
    """Judge image i against claim i; returns the results and their `judge_accuracy`."""
    if len(images) != len(claims):
        raise ValueError(f"{len(images)} images but {len(claims)} captions")
    results = [judge_image(im, cl, **analyse_kwargs) for im, cl in zip(images, claims)]
    return results, judge_accuracy(results)


# ----------------------------------------------------------------------------- self-evaluation

def degrade(image: Image.Image, sigma: float = 1.0, jpeg_quality: int = 50) -> Image.Image:
    """Gaussian blur then JPEG: a cheap stand-in for a lossy VQ reconstruction."""
    buf = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(sigma)).save(buf, format="JPEG", quality=jpeg_quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def evaluate_judge(num: int = 1000, size: int = 64, seed: int = 0, split: str = "test") -> dict[str, Any]:
    """Measure the judge on generated items: accuracy on the true captions (`text`) of clean and
    of degraded images (blur sigma = size / 64, JPEG 50), and the rejection rate of captions with
    exactly one attribute changed (only captions that are really false are counted)."""
    from ernie_vilg.data.shapes import (PERTURBATIONS, TEMPLATES, caption_with_template,
                                        claims_hold, make_item, perturb_scene)

    clean, degraded = [], []
    rejected = {k: [0, 0] for k in PERTURBATIONS}
    for i in range(num):
        img, rec = make_item(seed, split, i, size=size)
        comps = analyse_image(img)
        clean.append(judge_image(img, rec["text"], components=comps))
        degraded.append(judge_image(degrade(img, sigma=size / 64.0), rec["text"]))
        for kind in PERTURBATIONS:
            rng = np.random.default_rng([seed, 99, i, PERTURBATIONS.index(kind)])
            wrong = perturb_scene(rec["attrs"], kind, rng)
            pool = TEMPLATES if len(wrong.objects) > 1 else [t for t in TEMPLATES if t != "t6"]
            text = caption_with_template(wrong, pool[int(rng.integers(len(pool)))], rng)
            if claims_hold(parse_caption(text), rec["attrs"]):
                continue  # a relation ("它的右边") can stay true after a move
            rejected[kind][1] += 1
            rejected[kind][0] += not judge_image(img, text, components=comps).all_ok
    return {
        "num": num, "size": size, "seed": seed, "split": split,
        "true_captions": judge_accuracy(clean),
        "true_captions_blur_jpeg": judge_accuracy(degraded),
        "wrong_caption_rejection": {k: (r / n if n else None) for k, (r, n) in rejected.items()},
        "wrong_captions_judged": {k: n for k, (_, n) in rejected.items()},
    }


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="measure the shapes judge on generated items")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(evaluate_judge(a.num, a.size, a.seed), ensure_ascii=False, indent=1))
