"""The project's JSONL manifest: one image-text pair per line (the public interface in DESIGN.md).

`{"image": "relative/or/absolute/path.png", "text": "...", "texts": ["ref 1", ...], ...}`;
`texts` is optional and extra fields are kept. Image paths resolve relative to the manifest's
folder. Bad lines are skipped and counted (strict=False, the default for iteration) or raise
`ManifestError` naming the file and line (strict=True).
"""
from __future__ import annotations

import json
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A malformed manifest line; the message names the file and the line number."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


@dataclass
class ManifestRecord:
    image_path: str  # resolved path
    text: str
    texts: list[str] = field(default_factory=list)  # all references (includes `text`)
    extra: dict[str, Any] = field(default_factory=dict)  # every other field of the line
    line_no: int = 0

    @property
    def image(self) -> str:
        """The image path as written in the manifest."""
        return self.extra.get("_image_raw", self.image_path)


@dataclass
class ManifestStats:
    read: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


BOM = b"\xef\xbb\xbf"


def has_visible_text(text: str) -> bool:
    """False for text made only of whitespace, control and format characters (zero-width space
    U+200B, joiners, BOM ...): such a caption tokenizes to nothing."""
    return any(unicodedata.category(ch)[0] not in "CZ" for ch in text)


def decode_json_line(raw: bytes, where: str) -> Any:
    """One JSONL line -> its JSON value, or ManifestError naming `where` with a short reason.

    A leading UTF-8 BOM (editors on Windows write one) is dropped rather than making the first
    line invalid JSON. Nesting too deep for the parser (e.g. 100k `[`) and strings that cannot be
    written back as UTF-8 (lone surrogates such as "\\ud800") are bad lines, not crashes later on."""
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(where, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestError(where, f"not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ManifestError(where, "not valid JSON (nested too deeply)") from None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(where, "not UTF-8 (a lone surrogate escape such as \\ud800)") from None
    except RecursionError:
        raise ManifestError(where, "not valid JSON (nested too deeply)") from None
    return obj


def parse_line(raw: bytes, path: Path, line_no: int, require_text: bool = True) -> ManifestRecord:
    """Parse one manifest line, or raise ManifestError naming `path:line_no`."""
    where = f"{path}:{line_no}"
    obj = decode_json_line(raw, where)
    if not isinstance(obj, dict):
        raise ManifestError(where, f"expected a JSON object, got {type(obj).__name__}")
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ManifestError(where, "missing or empty 'image' field")
    text = obj.get("text")
    texts = obj.get("texts") or []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ManifestError(where, "'texts' must be a list of strings")
    texts = [t.strip() for t in texts if has_visible_text(t)]
    if text is None and texts:
        text = texts[0]
    if require_text:
        if not isinstance(text, str):
            raise ManifestError(where, "missing 'text' field")
        if not text.strip():
            raise ManifestError(where, "'text' is empty or whitespace only")
        if not has_visible_text(text):
            raise ManifestError(where, "'text' has no visible characters (only zero-width or control characters)")
    text = (text or "").strip()
    if text and text not in texts:
        texts = [text] + texts
    image_path = Path(image)
    if not image_path.is_absolute():
        image_path = path.parent / image_path
    extra = {k: v for k, v in obj.items() if k not in ("image", "text", "texts")}
    extra["_image_raw"] = image
    return ManifestRecord(str(image_path), text, texts, extra, line_no)


def iter_manifest(
    path: str | Path, strict: bool = False, require_text: bool = True, stats: ManifestStats | None = None
) -> Iterator[ManifestRecord]:
    """Stream records of a manifest of any size; bad lines are skipped and counted unless strict."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(str(path), "manifest file not found")
    stats = stats if stats is not None else ManifestStats()
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = parse_line(raw.rstrip(b"\r\n"), path, line_no, require_text)
            except ManifestError as exc:
                if strict:
                    raise
                stats.skip(exc.reason.split(" (")[0])
                log.warning("skipping manifest line: %s", exc)
                continue
            stats.read += 1
            yield rec


def read_manifest(path: str | Path, strict: bool = False, require_text: bool = True) -> list[ManifestRecord]:
    stats = ManifestStats()
    records = list(iter_manifest(path, strict=strict, require_text=require_text, stats=stats))
    if stats.skipped:
        log.warning("%s: %d lines read, %d skipped %s", path, stats.read, stats.skipped, stats.reasons)
    return records


def write_manifest(records: list[dict[str, Any]], path: str | Path) -> None:
    """Write dicts as JSONL atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(path)
