"""Streaming, resumable batches over a token shard folder (data/token_shards.py) for many ranks.

Unlike `TokenShards` (random access, all metadata in RAM), this loader holds one shard's
metadata and a bounded shuffle buffer at a time, so a corpus of any size streams in constant
memory. Semantics (also in docs/data.md):

- Partition across data-parallel ranks. With S shards and W ranks: if S >= W, rank r owns the
  shards i with i % W == r (disjoint whole files; ranks may own one shard more than others);
  if S < W, every rank reads every shard and owns the rows with global index g % W == r.
  Either way the ranks' rows are disjoint and together cover the folder.
- One epoch of a rank = each of its rows once. Shard order per epoch is a permutation drawn from
  `default_rng([seed, epoch, rank])`; a shard is read whole (at most `max_open_shards` in
  memory) and its rows, in order, pass through a shuffle buffer of `buffer_size` rows: once full, each incoming row
  replaces a uniformly chosen buffered row, which is emitted. At the end of the epoch the buffer
  is drained in random order, so epochs never mix. `shuffle=False` reads in storage order.
- Batches are consecutive samples (a batch may straddle an epoch boundary); the loader never
  ends. `state_dict()` between batches records epoch, shard cursor, row cursor, the keys
  (shard, row) of the buffered rows (their data is re-read on restore) and the buffer RNG state,
  so a restored loader continues with exactly the batches the uninterrupted one would produce.
- Bad records are skipped and counted (`stats`): a meta line that is not a JSON object with a
  string `text` (`bad_meta`), ids outside [0, codebook_size) (`bad_ids`), a row without a meta
  line (`missing_meta`), and a shard file that cannot be read or has the wrong shape / dtype
  (`bad_shards`, its rows counted in `bad_shard_rows`). An epoch with no good row raises.
"""
from __future__ import annotations

import json
import logging
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ernie_vilg.data.token_shards import TokenShardError, read_shard_info

log = logging.getLogger(__name__)

STAT_KEYS = ("bad_meta", "bad_ids", "missing_meta", "bad_shards", "bad_shard_rows")


class _Shard:
    """One opened shard: its ids in memory, a per-row range check, raw meta lines (parsed row by
    row). Reading a whole shard at once is what makes the loader fast: row access into a memmap
    and per-row range checks cost more than the rest of a sample's path."""

    def __init__(self, ids: Optional[np.ndarray], lines: list[str], error: str = "",
                 ids_ok: Optional[np.ndarray] = None) -> None:
        self.ids = ids
        self.lines = lines
        self.error = error
        self.ids_ok = ids_ok  # [n] bool: every id of the row is in [0, codebook_size)


def _mix(*values: int) -> int:
    """A 64-bit integer hash (splitmix64 steps): a cheap seeded choice without a Generator."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


class StreamingTokenLoader:
    """Endless, seeded, resumable batches of (image ids, text) rows for one data-parallel rank.

    Batches are dicts: `image_ids` int64 [B, h, w], `text` list[str], `texts` list[list[str]],
    `meta` list[dict] (the other meta fields), `index` int64 [B] (global row index in the
    folder), and `text_ids` when `encode_texts` (list[str] -> array) is given. With
    `random_text`, `text` is one of the row's `texts` drawn from (seed, epoch, row) instead of
    the first.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_size: int = 10000,
        shuffle: bool = True,
        encode_texts: Optional[Callable[[list[str]], np.ndarray]] = None,
        max_open_shards: int = 4,
        random_text: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if batch_size < 1 or buffer_size < 1:
            raise ValueError(f"batch_size and buffer_size must be >= 1, got {batch_size}, {buffer_size}")
        self.path = Path(path)
        info_path = self.path / "info.json"
        self.info: dict[str, Any] = read_shard_info(self.path)
        self.grid = int(self.info["grid"])
        self.codebook_size = int(self.info["codebook_size"])
        self.shards: list[dict[str, Any]] = list(self.info["shards"])
        if not self.shards:
            raise TokenShardError(f"{info_path}: no shards")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.buffer_size = buffer_size
        self.shuffle = shuffle
        self.encode_texts = encode_texts
        self.random_text = random_text
        self.max_open_shards = max(1, max_open_shards)
        # global index of each shard's first row (from info.json counts)
        self.offsets = np.cumsum([0] + [int(s["count"]) for s in self.shards])
        if len(self.shards) >= world_size:
            self.mode = "shards"
            self.my_shards = [i for i in range(len(self.shards)) if i % world_size == rank]
        else:
            self.mode = "rows"  # too few files to split: split rows by global index instead
            self.my_shards = list(range(len(self.shards)))
        self._open: "OrderedDict[int, _Shard]" = OrderedDict()
        self._reset_position(epoch=0)
        # buffer choices; Python's Mersenne Twister: ~10x cheaper per scalar draw than a numpy
        # Generator, and its state is a plain tuple of ints (saved in state_dict)
        self._rng = random.Random(_mix(seed, rank, 7919))
        self.stats = {k: 0 for k in STAT_KEYS}
        self._good_this_epoch = 0

    # ------------------------------------------------------------------ position
    def _reset_position(self, epoch: int) -> None:
        self.epoch = epoch
        self.shard_cursor = 0  # index into this epoch's shard order
        self.row_cursor = 0  # next row (within the shard) to consider
        self._buffer_keys: list[tuple[int, int]] = []
        self._buffer_items: list[tuple[np.ndarray, dict[str, Any]]] = []
        self._order = self._shard_order(epoch)

    def _shard_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(self.my_shards)
        perm = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.my_shards))
        return [self.my_shards[i] for i in perm]

    def rows_per_epoch(self) -> int:
        """Rows this rank owns (good or bad) in one epoch."""
        if self.mode == "shards":
            return int(sum(self.shards[i]["count"] for i in self.my_shards))
        n = int(self.offsets[-1])
        return len(range(self.rank, n, self.world_size))

    # ------------------------------------------------------------------ reading
    def _shard(self, k: int) -> _Shard:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        spec = self.shards[k]
        ids_path, meta_path = self.path / spec["ids"], self.path / spec["meta"]
        ids, lines, error, ok = None, [], "", None
        try:
            ids = np.load(ids_path, allow_pickle=False)
            if ids.ndim != 3 or ids.shape[1:] != (self.grid, self.grid) or not np.issubdtype(ids.dtype, np.integer):
                error = f"{ids_path}: shape {ids.shape} dtype {ids.dtype}, expected integer (n, {self.grid}, {self.grid})"
            elif ids.shape[0] != int(spec["count"]):
                error = f"{ids_path}: {ids.shape[0]} rows, info.json says {spec['count']}"
            else:
                flat = ids.reshape(len(ids), -1)
                ok = (flat.min(1) >= 0) & (flat.max(1) < self.codebook_size) if flat.size else np.ones(len(ids), bool)
                lines = meta_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except (OSError, ValueError) as exc:
            error = f"{ids_path}: cannot read ({type(exc).__name__}: {exc})"
        shard = _Shard(None if error else ids, lines, error, ok)
        self._open[k] = shard
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return shard

    def _row(self, k: int, row: int) -> tuple[Optional[tuple[np.ndarray, dict[str, Any]]], str]:
        """(ids, meta) of one row, or (None, reason) for a bad record."""
        shard = self._shard(k)
        if row >= len(shard.lines):
            return None, "missing_meta"
        try:
            meta = json.loads(shard.lines[row])
        except json.JSONDecodeError:
            return None, "bad_meta"
        if not isinstance(meta, dict) or not isinstance(meta.get("text"), str):
            return None, "bad_meta"
        if not shard.ids_ok[row]:
            return None, "bad_ids"
        return (shard.ids[row].copy(), meta), ""  # a copy: a view would pin the whole shard

    def _next_source_row(self) -> Optional[tuple[tuple[int, int], tuple[np.ndarray, dict[str, Any]]]]:
        """The next good row of this epoch in reading order (advancing the cursors), or None."""
        while self.shard_cursor < len(self._order):
            k = self._order[self.shard_cursor]
            count = int(self.shards[k]["count"])
            shard = self._shard(k)
            if shard.error:
                if self.row_cursor == 0:  # count a bad shard once per visit
                    self.stats["bad_shards"] += 1
                    self.stats["bad_shard_rows"] += count
                    log.warning("skipping shard: %s", shard.error)
                self.shard_cursor, self.row_cursor = self.shard_cursor + 1, 0
                continue
            if self.mode == "rows":
                # first row >= row_cursor whose global index belongs to this rank
                g = int(self.offsets[k]) + self.row_cursor
                self.row_cursor += (self.rank - g) % self.world_size
            if self.row_cursor >= count:
                self.shard_cursor, self.row_cursor = self.shard_cursor + 1, 0
                continue
            row = self.row_cursor
            self.row_cursor += 1
            item, reason = self._row(k, row)
            if item is None:
                self.stats[reason] += 1
                continue
            return (k, row), item
        return None

    def _next_sample(self) -> tuple[tuple[int, int], tuple[np.ndarray, dict[str, Any]]]:
        while True:
            got = self._next_source_row()
            if got is not None:
                self._good_this_epoch += 1
                if not self.shuffle:
                    return got
                if len(self._buffer_keys) < self.buffer_size:
                    self._buffer_keys.append(got[0])
                    self._buffer_items.append(got[1])
                    continue
                i = self._rng.randrange(len(self._buffer_keys))
                out = (self._buffer_keys[i], self._buffer_items[i])
                self._buffer_keys[i], self._buffer_items[i] = got
                return out
            if self._buffer_keys:  # epoch exhausted: drain the buffer in random order
                i = self._rng.randrange(len(self._buffer_keys))
                out = (self._buffer_keys[i], self._buffer_items[i])
                self._buffer_keys[i] = self._buffer_keys[-1]
                self._buffer_items[i] = self._buffer_items[-1]
                self._buffer_keys.pop()
                self._buffer_items.pop()
                return out
            if self._good_this_epoch == 0 and self.shard_cursor >= len(self._order):
                raise TokenShardError(f"{self.path}: rank {self.rank} has no readable row in epoch {self.epoch}")
            self._reset_position(self.epoch + 1)
            self._good_this_epoch = 0

    # ------------------------------------------------------------------ public
    def samples(self) -> Iterator[dict[str, Any]]:
        """Endless single samples (the same stream `__iter__` batches)."""
        while True:
            (k, row), (ids, meta) = self._next_sample()
            yield self._sample(k, row, ids, meta)

    def _sample(self, k: int, row: int, ids: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        meta = dict(meta)
        text = meta.pop("text")
        texts = meta.pop("texts", None) or [text]
        if self.random_text and len(texts) > 1:
            # paraphrases as augmentation; a pure function of (seed, epoch, row): no state to save
            text = texts[_mix(self.seed, self.epoch, int(self.offsets[k]) + row) % len(texts)]
        return {"image_ids": ids, "text": text, "texts": texts, "meta": meta, "index": int(self.offsets[k]) + row}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            items = []
            for _ in range(self.batch_size):
                (k, row), (ids, meta) = self._next_sample()
                items.append(self._sample(k, row, ids, meta))
            batch = {
                "image_ids": np.stack([it["image_ids"] for it in items]).astype(np.int64),
                "text": [it["text"] for it in items],
                "texts": [it["texts"] for it in items],
                "meta": [it["meta"] for it in items],
                "index": np.array([it["index"] for it in items], dtype=np.int64),
            }
            if self.encode_texts is not None:
                batch["text_ids"] = self.encode_texts(batch["text"])
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (paddle.save / JSON safe)."""
        version, words, gauss = self._rng.getstate()
        return {
            "epoch": self.epoch,
            "shard_cursor": self.shard_cursor,
            "row_cursor": self.row_cursor,
            "good_this_epoch": self._good_this_epoch,
            "buffer_shards": [k for k, _ in self._buffer_keys],
            "buffer_rows": [r for _, r in self._buffer_keys],
            "rng": {"version": version, "words": list(words), "gauss": gauss},
            "stats": dict(self.stats),
            "partition": {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                          "num_shards": len(self.shards), "rows": int(self.offsets[-1]),
                          "buffer_size": self.buffer_size, "shuffle": self.shuffle},
        }

    def set_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken. If the partition changed (other world size,
        rank, seed, folder or buffer size), exact resume is impossible: restart the saved epoch
        from its beginning and say so."""
        self.stats = {k: int(state.get("stats", {}).get(k, 0)) for k in STAT_KEYS}
        mine = self.state_dict()["partition"]
        if state.get("partition") != mine:
            log.warning("data partition changed (%s -> %s): restarting epoch %d from its start",
                        state.get("partition"), mine, int(state["epoch"]))
            self._reset_position(int(state["epoch"]))
            self._good_this_epoch = 0
            return
        self._reset_position(int(state["epoch"]))
        self.shard_cursor = int(state["shard_cursor"])
        self.row_cursor = int(state["row_cursor"])
        self._good_this_epoch = int(state.get("good_this_epoch", 0))
        keys = list(zip((int(k) for k in state["buffer_shards"]), (int(r) for r in state["buffer_rows"])))
        items = []
        for k, row in keys:  # buffered rows were good when read; re-read their data
            item, reason = self._row(k, row)
            if item is None:
                raise TokenShardError(f"{self.path}: buffered row {row} of shard {k} is now unreadable ({reason})")
            items.append(item)
        self._buffer_keys, self._buffer_items = keys, items
        r = state["rng"]
        self._rng.setstate((int(r["version"]), tuple(int(w) for w in r["words"]), r["gauss"]))
