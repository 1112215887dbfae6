"""Image preprocessing (sec. 4.1: center crop, resize) and resumable image batches.

`load_image` is strict: a corrupt, empty, missing or oversized image raises `ImageError` naming
the file. Iteration (`ImageBatches`) is forgiving: it skips such files and counts them, so one bad
image in a large manifest does not kill a job.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image, ImageFile

from ernie_vilg.data.manifest import ManifestError, ManifestRecord, read_manifest

log = logging.getLogger(__name__)

# Decompression-bomb guard: refuse images above this many pixels (PIL warns at 89M, errors at 179M).
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, LA, P, PA, RGBA, CMYK, I;16, I, F, YCbCr...) to 8-bit RGB.

    Transparent pixels are composited on white, the usual choice for web images.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale the full range to 8 bits instead of clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Center crop to a square, then resize to `size` x `size` (bicubic down, as usual for VQ)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BICUBIC)
    return img


def normalize(img: Image.Image) -> np.ndarray:
    """RGB uint8 HWC -> float32 CHW in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def denormalize(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] (B)CHW -> uint8 (B)HWC."""
    arr = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(arr, -3, -1)


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, or raise ImageError naming the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: image file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(
                        f"{path}: image is {w}x{h} = {w * h} pixels, above the limit of "
                        f"{MAX_IMAGE_PIXELS} (decompression-bomb guard)"
                    )
                if w < 1 or h < 1:
                    raise ImageError(f"{path}: image has no pixels ({w}x{h})")
                img.load()  # decode now so truncation errors surface here
                return img.copy()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused by the decompression-bomb guard ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Read one image as float32 [3, size, size] in [-1, 1]; raise ImageError naming the file."""
    return normalize(center_crop_resize(to_rgb(open_image(path)), size))


# Truncated files must fail loudly rather than be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_or_error(path: str, size: int) -> tuple[Optional[np.ndarray], str]:
    """(image, "") or (None, the ImageError's message): errors cross a process boundary as text."""
    try:
        return load_image(path, size), ""
    except ImageError as exc:
        return None, str(exc)


class ImageBatches:
    """Endless, seeded, resumable batches of images from a manifest, partitioned across ranks.

    Each epoch visits a permutation of the records (seeded by `seed + epoch`); rank r takes
    every `world_size`-th item of it. Bad images are skipped and counted (`skipped`), and
    logged once each. `state_dict()` records (epoch, position) so resuming continues the
    same order exactly.
    """

    def __init__(
        self,
        manifest: str | Path,
        image_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        records: Optional[list[ManifestRecord]] = None,
        num_workers: int = 0,
    ) -> None:
        self.records = records if records is not None else read_manifest(manifest)
        if not self.records:
            raise ManifestError(str(manifest), "manifest has no usable records")
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into this rank's slice of the epoch order
        self.skipped = 0
        self._bad: set[str] = set()
        # distinct paths, not lines: a path listed on two lines fails twice but is one bad image,
        # so comparing bad paths with the line count never stopped an all-bad manifest (a hang)
        self._num_paths = len({rec.image_path for rec in self.records})
        # Data.num_workers > 0: decode each batch in that many processes (data/image_workers.py);
        # the batches and the state are the same as with 0
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self._workers: Any = None

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.records)
        order = np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank :: self.world_size]

    def _next_records(self, count: int) -> list[ManifestRecord]:
        """The next `count` records of this rank's order (advancing epochs as needed)."""
        out = []
        order = self._order(self.epoch)
        for _ in range(count):
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
                order = self._order(self.epoch)
            out.append(self.records[order[self.position]])
            self.position += 1
        return out

    def _decode(self, recs: list[ManifestRecord]) -> list[tuple[Optional[np.ndarray], str]]:
        if self.num_workers > 0:
            from ernie_vilg.data.image_workers import ImageWorkers

            if self._workers is None:
                self._workers = ImageWorkers(self.num_workers)
            return self._workers.decode(decode_or_error, [rec.image_path for rec in recs], self.image_size)
        return [decode_or_error(rec.image_path, self.image_size) for rec in recs]

    def close(self) -> None:
        """End the decoding processes (num_workers > 0); iterating again restarts them."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            images, paths, records = [], [], []
            while len(images) < self.batch_size:
                # exactly the records a one-by-one loop would visit: a bad image is replaced by
                # the next record in the following round, so the order never depends on workers
                recs = self._next_records(self.batch_size - len(images))
                for rec, (image, error) in zip(recs, self._decode(recs)):
                    if image is None:
                        self.skipped += 1
                        if rec.image_path not in self._bad:
                            self._bad.add(rec.image_path)
                            log.warning("skipping bad image (%d skipped so far): %s", self.skipped, error)
                        if len(self._bad) >= self._num_paths:
                            raise ImageError("every image of the manifest failed to load") from None
                        continue
                    images.append(image)
                    paths.append(rec.image_path)
                    records.append(rec)
            yield {"images": np.stack(images), "paths": paths, "records": records}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped}

    def set_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.skipped = int(state.get("skipped", 0))
