"""Training logs: a console line, `log.jsonl`, and VisualDL scalars, images and texts (optional).

VisualDL (2.5.3, works with numpy<2) writes `<output_dir>/vdl`; view it with
`visualdl --logdir <output_dir>/vdl`. If it is not importable the scalars are skipped with one
message. Only rank 0 writes. Validation media (`write_media`): image grids (`add_image`, mirrored
as PNG files to `<output_dir>/samples/step-N.png`) and texts (`add_text`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

# scalar names in VisualDL: everything a record holds, grouped by split ("train/loss", ...)
CONSOLE_KEYS = ("loss", "lr", "tokens_per_s", "model_flops_per_s", "skipped_steps", "loss_scale")


def _open_visualdl(logdir: Path) -> Optional[Any]:
    try:
        from visualdl import LogWriter
    except Exception as exc:  # ImportError, or a broken dependency (protobuf, numpy ABI)
        log.info("VisualDL not available (%s: %s): scalars go to log.jsonl only",
                 type(exc).__name__, exc)
        return None
    return LogWriter(logdir=str(logdir))


class MetricsLogger:
    """Writes each record to log.jsonl and VisualDL, and prints a console line for train records."""

    def __init__(self, out: Path, enabled: bool = True, visualdl: bool = True) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self._want_vdl = visualdl
        self._vdl: Optional[Any] = None
        self._vdl_tried = False

    def _writer(self) -> Optional[Any]:
        if not self._vdl_tried:  # opened lazily, once: the message appears at most once
            self._vdl_tried = True
            if self._want_vdl:
                self._vdl = _open_visualdl(self.out / "vdl")
        return self._vdl

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "log.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        writer = self._writer()
        step, split = int(record.get("step", 0)), record.get("split", "train")
        if writer is not None:
            for key, value in record.items():
                if key in ("step", "split") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                writer.add_scalar(tag=f"{split}/{key}", value=float(value), step=step)
        if split == "train":
            log.info(console_line(record))

    def drop_after(self, step: int) -> None:
        """Remove log.jsonl records of steps after `step` (a resumed run trains them again, so
        they would appear twice). VisualDL files are append-only: there the later value wins."""
        path = self.out / "log.jsonl"
        if not self.enabled or not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                later = int(json.loads(line).get("step", 0)) > step
            except (ValueError, AttributeError, TypeError):
                later = False  # keep what we cannot read rather than lose it
            if later:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(path)

    def write_media(self, step: int, media: Any) -> list[Path]:
        """Log a `data.media.ValidationMedia`: every grid with add_image under `val/<tag>`,
        every text with add_text; the first grid is mirrored to samples/step-N.png, the others to
        samples/step-N_<tag>.png (a PNG needs no VisualDL to look at). Returns the PNG paths."""
        if not self.enabled or media is None:
            return []
        from PIL import Image

        samples = self.out / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        writer = self._writer()
        paths = []
        for i, (tag, grid) in enumerate(media.images.items()):
            slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in tag)
            path = samples / (f"step-{step}.png" if i == 0 else f"step-{step}_{slug}.png")
            tmp = path.with_name(path.name + ".tmp")
            Image.fromarray(grid).save(tmp, format="PNG")
            tmp.replace(path)
            paths.append(path)
            if writer is not None:
                writer.add_image(tag=f"val/{tag}", img=grid, step=step, dataformats="HWC")
        if writer is not None:
            for tag, text in media.texts.items():
                writer.add_text(tag=f"val/{tag}", text_string=text, step=step)
            writer.flush()
        return paths

    def close(self) -> None:
        if self._vdl is not None:
            self._vdl.close()
            self._vdl = None
        self._vdl_tried = False


def console_line(record: dict[str, Any]) -> str:
    parts = [f"step {record.get('step')}"]
    for key in CONSOLE_KEYS:
        if key in record and record[key] is not None:
            parts.append(f"{key} {record[key]:.4g}")
    # per-direction losses and other stage logs (loss_t2i, loss_i2t, ...)
    parts += [f"{k} {v:.4g}" for k, v in record.items()
              if k.startswith("loss_") and isinstance(v, (int, float))]
    return " | ".join(parts)

