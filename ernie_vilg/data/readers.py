"""Readers of the public datasets the paper uses, converting them to the project's JSONL manifest.

Formats (as released):

- AIC-ICC: a JSON list of ``{"url", "image_id": "<sha>.jpg", "caption": [5 sentences]}``; captions
  carry stray newlines and sometimes a trailing "。", both removed.
- COCO-CN: split files (one id per line, e.g. ``COCO_val2014_000000217153``) and caption files
  (``imageid.human-written-caption.txt``, lines ``<id>#<n>\\t<caption>``); the merged test references
  are a COCO caption JSON.
- FM-IQA: ``{"train": [...], "val": [...]}`` of ``{"question_id", "image_id", "Question", "Answer"}``
  (image ids are MS-COCO ids; train from train2014, val from val2014).
- MS-COCO captions (``captions_val2014.json``): ``images`` + ``annotations``.

Every reader yields `Item`s (id, candidate image paths, texts, extra fields); `write_converted`
resolves images, skips and counts the missing ones, and writes the manifest (paths relative to
the manifest's folder) and optionally a REF JSONL for `tools/eval_caption.py`.
Malformed input raises `DatasetFormatError` naming the file and the line (or the JSON item).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ernie_vilg.data.manifest import write_manifest

FORMATS = ("aic_icc", "coco_cn", "fmiqa", "coco")


class DatasetFormatError(ValueError):
    """Malformed dataset input; the message names the file and the line or item."""


@dataclass
class Item:
    key: str  # dataset id (image id, or question id for FM-IQA)
    images: list[str]  # candidate paths relative to the images folder, first existing wins
    texts: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CocoImage:
    id: int | str
    file_name: str
    captions: list[str]


@dataclass
class ConversionReport:
    items: int = 0  # items read from the input
    written: int = 0  # manifest lines written
    missing_images: int = 0  # items skipped because no image file exists
    missing_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"items": self.items, "written": self.written, "missing_images": self.missing_images,
                "missing_examples": self.missing_examples}


_NEWLINES = re.compile(r"\s*[\r\n]+\s*")


def clean_caption(text: str) -> str:
    """Remove stray newlines (with the spaces around them), outer whitespace and trailing 。."""
    return _NEWLINES.sub("", text).strip().rstrip("。").strip()


def load_json(path: Path, error: type[Exception] = DatasetFormatError) -> Any:
    """A UTF-8 JSON file; `error` (one line naming the file, and the line for bad JSON) when it
    is missing, not UTF-8 or not JSON."""
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of a UTF-8 text file, skipping blank lines."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetFormatError(f"{path}:{line_no}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            line = line.rstrip("\r\n")
            if line.strip():
                yield line_no, line


def _captions(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise DatasetFormatError(f"{where}: 'caption' must be a list of strings")
    caps = [clean_caption(c) for c in value]
    return [c for c in caps if c]


def _coco_candidates(name: str, split_hint: str | None = None) -> list[str]:
    """Where an MS-COCO image may sit under the images folder: flat, or in its split subfolder."""
    stem = name[:-4] if name.lower().endswith(".jpg") else name
    file = stem + ".jpg"
    m = re.match(r"COCO_(train|val|test)(\d{4})_", stem)
    sub = f"{m.group(1)}{m.group(2)}" if m else split_hint
    return [file, f"{sub}/{file}"] if sub else [file]


# ----------------------------------------------------------------------------- AIC-ICC


def read_aic_icc(path: str | Path) -> list[Item]:
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of {{url, image_id, caption}} items")
    items = []
    for i, obj in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(obj, dict) or not isinstance(obj.get("image_id"), str) or not obj["image_id"].strip():
            raise DatasetFormatError(f"{where}: missing 'image_id'")
        caps = _captions(obj.get("caption"), where)
        if not caps:
            raise DatasetFormatError(f"{where}: no non-empty caption")
        image_id = obj["image_id"].strip()
        extra = {"id": image_id}
        if obj.get("url"):
            extra["url"] = obj["url"]
        items.append(Item(image_id, [image_id], caps, extra))
    return items


# ----------------------------------------------------------------------------- COCO-CN

COCO_CN_CAPTIONS = "imageid.human-written-caption.txt"


def read_coco_cn_split(path: str | Path) -> list[str]:
    """A COCO-CN split file: one image id per line."""
    path = Path(path)
    ids = []
    for line_no, line in _text_lines(path):
        key = line.strip()
        if "\t" in key or " " in key or "#" in key:
            raise DatasetFormatError(f"{path}:{line_no}: expected one image id per line, got {key[:60]!r}")
        ids.append(key)
    return ids


def read_coco_cn_captions(path: str | Path) -> dict[str, list[str]]:
    """``<image id>#<n>\\t<caption>`` lines, grouped by image id in sentence-number order."""
    path = Path(path)
    found: dict[str, list[tuple[int, str]]] = {}
    for line_no, line in _text_lines(path):
        head, sep, caption = line.partition("\t")
        key, hash_, num = head.strip().rpartition("#")
        if not sep or not hash_ or not key or not num.isdigit():
            raise DatasetFormatError(f"{path}:{line_no}: expected '<image id>#<n><TAB><caption>', got {line[:60]!r}")
        caption = clean_caption(caption)
        if not caption:
            raise DatasetFormatError(f"{path}:{line_no}: empty caption")
        found.setdefault(key, []).append((int(num), caption))
    return {k: [c for _, c in sorted(v)] for k, v in found.items()}


def read_coco_cn(inputs: Sequence[str | Path], split: str | None = None) -> list[Item]:
    """COCO-CN from its release folder or caption file(s), or from a COCO-style merged JSON.

    `inputs`: the release folder (uses imageid.human-written-caption.txt), caption files, or one
    ``.json`` (merged references). `split`: ``train``/``val``/``test`` (file ``coco-cn_<split>.txt``
    beside the captions) or the path of a split file; None keeps every image.
    """
    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].suffix == ".json":
        return read_coco(paths[0])
    files: list[Path] = []
    for p in paths:
        files.append(p / COCO_CN_CAPTIONS if p.is_dir() else p)
    captions: dict[str, list[str]] = {}
    for f in files:
        for key, caps in read_coco_cn_captions(f).items():
            captions.setdefault(key, []).extend(caps)
    keys: Iterable[str] = captions.keys()
    if split:
        split_file = Path(split) if Path(split).is_file() else files[0].parent / f"coco-cn_{split}.txt"
        if not split_file.is_file():
            raise DatasetFormatError(f"{split_file}: split file not found (give train/val/test or a path)")
        keys = read_coco_cn_split(split_file)
        lacking = [k for k in keys if k not in captions]
        if lacking:
            raise DatasetFormatError(f"{split_file}: {len(lacking)} id(s) have no caption in "
                                     f"{', '.join(map(str, files))}, e.g. {lacking[:3]}")
    return [Item(k, _coco_candidates(k), captions[k], {"id": k}) for k in keys]


# ----------------------------------------------------------------------------- FM-IQA


def read_fmiqa(path: str | Path, split: str | None = None) -> list[Item]:
    """FM-IQA question/answer pairs; text = the answer (the generation target)."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DatasetFormatError(f"{path}: expected {{\"train\": [...], \"val\": [...]}}")
    if split is not None and split not in data:
        raise DatasetFormatError(f"{path}: no split {split!r}; it has {sorted(data)}")
    items = []
    for name in [split] if split else sorted(data):
        for i, obj in enumerate(data[name]):
            where = f"{path}: {name}[{i}]"
            if not isinstance(obj, dict):
                raise DatasetFormatError(f"{where}: expected an object")
            for key in ("question_id", "image_id", "Question", "Answer"):
                if key not in obj:
                    raise DatasetFormatError(f"{where}: missing '{key}'")
            question, answer = clean_caption(str(obj["Question"])), clean_caption(str(obj["Answer"]))
            if not question or not answer:
                raise DatasetFormatError(f"{where}: empty question or answer")
            image_id = obj["image_id"]
            if isinstance(image_id, int) or str(image_id).isdigit():
                sub = "train2014" if name == "train" else "val2014"
                file = f"COCO_{sub}_{int(image_id):012d}.jpg"
                candidates = [file, f"{sub}/{file}", f"{int(image_id)}.jpg"]
            else:
                candidates = _coco_candidates(str(image_id))
            extra = {"id": obj["question_id"], "image_id": image_id, "question": question,
                     "answer": answer, "split": name}
            items.append(Item(str(obj["question_id"]), candidates, [answer], extra))
    return items


# ----------------------------------------------------------------------------- MS-COCO


def load_coco_captions(path: str | Path) -> list[CocoImage]:
    """A COCO caption JSON (``images`` + ``annotations``): images in file order with their captions."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DatasetFormatError(f"{path}: expected a COCO caption JSON with 'images' and 'annotations' lists")
    images: dict[Any, CocoImage] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise DatasetFormatError(f"{path}: images[{i}]: missing 'id'")
        if img["id"] in images:
            raise DatasetFormatError(f"{path}: images[{i}]: duplicate id {img['id']!r}")
        images[img["id"]] = CocoImage(img["id"], str(img.get("file_name", "")), [])
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DatasetFormatError(f"{where}: expected 'image_id' and a string 'caption'")
        if ann["image_id"] not in images:
            raise DatasetFormatError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        caption = clean_caption(ann["caption"])
        if not caption:
            raise DatasetFormatError(f"{where}: empty caption")
        images[ann["image_id"]].captions.append(caption)
    return list(images.values())


def read_coco(path: str | Path) -> list[Item]:
    items = []
    for img in load_coco_captions(path):
        if img.captions:
            items.append(Item(str(img.id), _coco_candidates(img.file_name) if img.file_name else [f"{img.id}.jpg"],
                              img.captions, {"id": img.id}))
    return items


# ----------------------------------------------------------------------------- writing


def read_dataset(fmt: str, inputs: Sequence[str | Path], split: str | None = None) -> list[Item]:
    if fmt == "aic_icc":
        return [it for p in inputs for it in read_aic_icc(p)]
    if fmt == "coco_cn":
        return read_coco_cn(inputs, split)
    if fmt == "fmiqa":
        return [it for p in inputs for it in read_fmiqa(p, split)]
    if fmt == "coco":
        return [it for p in inputs for it in read_coco(p)]
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def write_converted(
    items: Sequence[Item],
    images_dir: str | Path,
    out: str | Path,
    ref_out: str | Path | None = None,
    check_images: bool = True,
    per_caption: bool = False,
) -> ConversionReport:
    """Write the manifest (and a REF JSONL); items whose image is missing are skipped and counted."""
    images_dir, out = Path(images_dir).absolute(), Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(items=len(items))
    records, refs = [], []
    for it in items:
        image = images_dir / it.images[0]
        if check_images:
            found = next((images_dir / c for c in it.images if (images_dir / c).is_file()), None)
            if found is None:
                report.missing_images += 1
                if len(report.missing_examples) < 5:
                    report.missing_examples.append(str(image))
                continue
            image = found
        rel = os.path.relpath(image, out.parent)
        # One line per image with every reference in `texts`, or one line per caption.
        for i, text in enumerate(it.texts if per_caption else it.texts[:1]):
            rec: dict[str, Any] = {"image": rel, "text": text}
            if not per_caption:
                rec["texts"] = list(it.texts)
            rec.update(it.extra)
            if per_caption:
                rec["caption_index"] = i
            records.append(rec)
        refs.append({"id": it.extra.get("id", it.key), "captions": list(it.texts)})
    write_manifest(records, out)
    report.written = len(records)
    if ref_out is not None:
        write_manifest(refs, ref_out)
    return report


def convert_dataset(
    fmt: str,
    inputs: Sequence[str | Path],
    images_dir: str | Path,
    out: str | Path,
    split: str | None = None,
    ref_out: str | Path | None = None,
    check_images: bool = True,
    per_caption: bool = False,
) -> ConversionReport:
    """Read a dataset in its released format and write the project's manifest (and REF JSONL)."""
    return write_converted(read_dataset(fmt, inputs, split), images_dir, out, ref_out, check_images, per_caption)
