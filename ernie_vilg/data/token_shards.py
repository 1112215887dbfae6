"""Token shards: image token ids of a whole manifest, memory-mappable, for transformer training.

Layout of a shard folder:

    info.json                 {"format": "ernie-vilg-token-shards", "version": 1, "grid": h,
                               "codebook_size": K, "dtype": "uint16", "count": N,
                               "shards": [{"ids": "shard-00000.npy", "meta": "shard-00000.jsonl",
                                           "count": n}, ...], ...extra info}
    shard-00000.npy           ids [n, h, h] (uint16 when K <= 65536, else int32), np.load(mmap)
    shard-00000.jsonl         one line per row: {"text", "texts", "image", and kept fields}

Every file is written under a temporary name and renamed, and info.json is written last, so a
crash never leaves a folder that looks complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

FORMAT = "ernie-vilg-token-shards"


class TokenShardError(ValueError):
    """A token shard folder that cannot be read; the message names the file."""


@dataclass
class TokenRecord:
    image_ids: np.ndarray  # [h, w] integer ids
    text: str
    texts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _ids_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, bad text) leaves no .tmp behind
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class TokenShardWriter:
    """Accumulates (ids, record) rows and writes fixed-size shards; `close()` writes info.json."""

    def __init__(
        self, out_dir: str | Path, grid: int, codebook_size: int, shard_size: int = 10000,
        info: Optional[dict[str, Any]] = None, prefix: str = "shard",
    ) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.grid = grid
        self.codebook_size = codebook_size
        self.dtype = _ids_dtype(codebook_size)
        self.shard_size = shard_size
        self.info = dict(info or {})
        self.prefix = prefix
        self.shards: list[dict[str, Any]] = []
        self._ids: list[np.ndarray] = []
        self._meta: list[str] = []

    def add(self, ids: np.ndarray, text: str, texts: list[str], meta: dict[str, Any]) -> None:
        ids = np.asarray(ids)
        if ids.shape != (self.grid, self.grid):
            raise TokenShardError(f"ids of shape {ids.shape}, expected ({self.grid}, {self.grid})")
        if ids.min() < 0 or ids.max() >= self.codebook_size:
            raise TokenShardError(f"ids outside [0, {self.codebook_size})")
        self._ids.append(ids.astype(self.dtype))
        line = {"text": text, "texts": texts, **meta}
        self._meta.append(json.dumps(line, ensure_ascii=False))
        if len(self._ids) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        name = f"{self.prefix}-{len(self.shards):05d}"
        _atomic_save_npy(self.out / f"{name}.npy", np.stack(self._ids))
        _atomic_write_text(self.out / f"{name}.jsonl", "\n".join(self._meta) + "\n")
        self.shards.append({"ids": f"{name}.npy", "meta": f"{name}.jsonl", "count": len(self._ids)})
        self._ids, self._meta = [], []

    @property
    def rows(self) -> int:
        """Rows added so far (written shards and the pending one)."""
        return sum(s["count"] for s in self.shards) + len(self._ids)

    def close(self) -> dict[str, Any]:
        self._flush()
        info = {
            "format": FORMAT, "version": 1, "grid": self.grid, "codebook_size": self.codebook_size,
            "dtype": self.dtype.name, "count": sum(s["count"] for s in self.shards),
            "shards": self.shards, **self.info,
        }
        _atomic_write_text(self.out / "info.json", json.dumps(info, ensure_ascii=False, indent=1))
        return info


def read_shard_info(path: str | Path) -> dict[str, Any]:
    """The validated info.json of a token shard folder (TokenShardError naming the file otherwise)."""
    info_path = Path(path) / "info.json"
    if not info_path.is_file():
        raise TokenShardError(f"{info_path}: not found (is {Path(path)} a token shard folder?)")
    try:
        info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenShardError(f"{info_path}: not valid JSON ({exc})") from None
    if info.get("format") != FORMAT:
        raise TokenShardError(f"{info_path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    return info


class TokenShards:
    """Random access to every row of a shard folder; ids are memory-mapped, metadata in RAM."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.info = read_shard_info(self.path)
        self.grid = int(self.info["grid"])
        self.codebook_size = int(self.info["codebook_size"])
        expected_dtype = _ids_dtype(self.codebook_size)
        self._ids: list[np.ndarray] = []
        self._meta: list[dict[str, Any]] = []
        for shard in self.info["shards"]:
            ids_path = self.path / shard["ids"]
            try:
                ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise TokenShardError(f"{ids_path}: cannot read ids ({exc})") from None
            if ids.dtype != expected_dtype:
                raise TokenShardError(f"{ids_path}: dtype {ids.dtype}, expected {expected_dtype}")
            if ids.ndim != 3 or ids.shape[1:] != (self.grid, self.grid) or ids.shape[0] != shard["count"]:
                raise TokenShardError(
                    f"{ids_path}: shape {ids.shape}, expected ({shard['count']}, {self.grid}, {self.grid})"
                )
            meta_path = self.path / shard["meta"]
            lines = meta_path.read_text(encoding="utf-8").splitlines()
            if len(lines) != shard["count"]:
                raise TokenShardError(f"{meta_path}: {len(lines)} lines, expected {shard['count']}")
            self._ids.append(ids)
            self._meta.extend(json.loads(line) for line in lines)
        self._offsets = np.cumsum([0] + [len(a) for a in self._ids])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def ids(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return np.asarray(self._ids[shard][index - self._offsets[shard]], dtype=np.int64)

    def __getitem__(self, index: int) -> TokenRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        meta = dict(self._meta[index])
        text = meta.pop("text")
        texts = meta.pop("texts", []) or [text]
        return TokenRecord(self.ids(index), text, texts, meta)
