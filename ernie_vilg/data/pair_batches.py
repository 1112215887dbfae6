"""Batches of (text ids, image ids) pairs from token shards, both exactly resumable:

- `ShardBatches`: rows held in memory (random access): validation, and the VQA / end-to-end
  stages' training batches (their subclasses add fields);
- `StreamBatches`: rows streamed from a shard folder in constant memory (the vilg stage);
- `E2EBatches`: `ShardBatches` plus the rows' gold images (the end-to-end stage).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import paddle

from ernie_vilg.config import ConfigError
from ernie_vilg.data.images import load_image
from ernie_vilg.text.tokenizer import pad_ids

log = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 200_000  # encoded texts kept by StreamBatches (small corpora fit whole)


class ShardBatches:
    """Endless, seeded, resumable batches of (text ids, image ids) from token shards held in memory
    (random access): validation here, and the VQA / end-to-end stages' training batches.

    Texts are cut to `max_tokens` ids and padded to the longest text of the batch (padding is
    compute a CPU cannot spare; the model takes any text length up to Model.max_text_len).
    Epoch e visits the items of this rank (`perm[rank::world_size]`, perm seeded by (seed, e)) in
    batches; each visit picks one of the item's reference texts (seeded by (seed, e, item)), so the
    paraphrases act as augmentation. The state is (epoch, position within the epoch).
    """

    def __init__(self, shards: Any, text_tokenizer: Any, batch_size: int, max_tokens: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(shards) < world_size:
            raise ConfigError(f"{len(shards)} training items cannot feed {world_size} ranks")
        self.shards, self.tok = shards, text_tokenizer
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._encoded: dict[str, list[int]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def set_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        return perm[self.rank::self.world_size]

    def _text_ids(self, text: str) -> list[int]:
        if text not in self._encoded:  # tokenising is slow next to a tiny model's step
            self._encoded[text] = self.tok.encode(text, self.max_tokens)
        return self._encoded[text]

    def _text_choice(self, item: int, count: int) -> int:
        """Which of an item's `count` reference texts this epoch's visit uses (seeded)."""
        return int(np.random.default_rng([self.seed, self.epoch, item]).integers(count))

    def _batch(self, items: list[int]) -> dict[str, paddle.Tensor]:
        """The batch of these items (subclasses add fields: VQA prefixes, gold pixels)."""
        texts, images = [], []
        for i in items:
            rec = self.shards[i]
            texts.append(self._text_ids(rec.texts[self._text_choice(i, len(rec.texts))]))
            images.append(rec.image_ids)
        width = max(len(t) for t in texts)
        return {"text_ids": paddle.to_tensor(pad_ids(texts, width, self.tok.pad_id)),  # [B, L]
                "image_ids": paddle.to_tensor(np.stack(images).astype(np.int64))}  # [B, h, w]

    def __iter__(self) -> Iterator[dict[str, paddle.Tensor]]:
        while True:
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            idx = [int(i) for i in order[self.position:self.position + self.batch_size]]
            batch = self._batch(idx)  # before advancing: the epoch seeds the text choice
            self.position += len(idx)
            yield batch


class StreamBatches:
    """Endless, seeded, exactly resumable training batches of (text ids, image ids), streamed from
    a token shard folder in constant memory (`data.streaming.StreamingTokenLoader`).

    The rows are split into `partitions` fixed partitions (the loader's rank-disjoint split with
    world size = partitions: whole shards when there are enough, else rows by index), each a
    seeded stream with its own shuffle buffer. Data rank r of W owns the partitions p with
    p % W == r and takes an equal share of its batch from each. Since the partitions do not depend
    on W, W ranks with batch b together consume exactly the rows of one process with batch W * b:
    a run's data does not change with the number of processes (when W divides `partitions`).
    Each partition runs its own epochs; partitions of unequal size (shards mode with a shard count
    that is not a multiple of `partitions`) cycle at different rates, so their rows are seen
    slightly more or less often (tokenize_images.py writes equal shards: the difference is at most
    one shard per partition).

    As `ShardBatches`: one of an item's reference texts per visit, seeded by (seed, epoch, row)
    (paraphrases as augmentation); texts cut to `max_tokens` ids and padded to the batch's longest
    (padding is compute a CPU cannot spare). The state holds each owned partition's loader state.
    """

    def __init__(self, path: str | Path, text_tokenizer: Any, batch_size: int, max_tokens: int, seed: int,
                 rank: int = 0, world_size: int = 1, partitions: int = 4, buffer_size: int = 1024) -> None:
        from ernie_vilg.data.streaming import StreamingTokenLoader

        if partitions < 1 or buffer_size < 1:
            raise ConfigError(f"Data.stream_partitions={partitions} / Data.shuffle_buffer={buffer_size}: need >= 1")
        if partitions % world_size:
            # every rank needs a partition; rounding up keeps the split disjoint, but the data
            # order then differs from runs with another number of processes
            rounded = -(-partitions // world_size) * world_size
            log.warning("Data.stream_partitions=%d is not a multiple of %d data ranks: using %d",
                        partitions, world_size, rounded)
            partitions = rounded
        self.tok, self.max_tokens = text_tokenizer, max_tokens
        self.partitions, self.rank, self.world_size = partitions, rank, world_size
        self.owned = [p for p in range(partitions) if p % world_size == rank]
        if batch_size < len(self.owned):
            raise ConfigError(f"Data.batch_size={batch_size} is smaller than the {len(self.owned)} stream "
                              f"partitions of a rank (lower Data.stream_partitions)")
        # an equal share per partition; the first `batch_size % n` partitions take one more row
        n = len(self.owned)
        self.shares = [batch_size // n + (i < batch_size % n) for i in range(n)]
        # max_open_shards=2: buffered rows are copies, so a partition needs the shard it reads (+1)
        self.loaders = [StreamingTokenLoader(path, 1, seed=seed, rank=p, world_size=partitions,
                                             buffer_size=buffer_size, random_text=True, max_open_shards=2)
                        for p in self.owned]
        self._encoded: dict[str, list[int]] = {}

    @property
    def stats(self) -> dict[str, int]:
        """Bad records skipped so far, summed over this rank's partitions."""
        out: dict[str, int] = {}
        for loader in self.loaders:
            for key, value in loader.stats.items():
                out[key] = out.get(key, 0) + value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"partitions": self.partitions, "owned": list(self.owned),
                "loaders": [loader.state_dict() for loader in self.loaders]}

    def set_state_dict(self, state: dict[str, Any]) -> None:
        saved = dict(zip((int(p) for p in state.get("owned", [])), state.get("loaders", [])))
        if int(state.get("partitions", -1)) != self.partitions:
            log.warning("data stream had %s partitions, now %d: starting the streams afresh",
                        state.get("partitions"), self.partitions)
            saved = {}
        for p, loader in zip(self.owned, self.loaders):
            if p in saved:
                loader.set_state_dict(saved[p])
            else:  # another world size saved this state: this partition was another rank's
                log.warning("no saved position for stream partition %d: it starts from its beginning", p)

    def _text_ids(self, text: str) -> list[int]:
        if text not in self._encoded:  # tokenising is slow next to a tiny model's step
            if len(self._encoded) >= TEXT_CACHE_SIZE:  # bounded: a streamed corpus has no end of texts
                self._encoded.clear()
            self._encoded[text] = self.tok.encode(text, self.max_tokens)
        return self._encoded[text]

    def __iter__(self) -> Iterator[dict[str, paddle.Tensor]]:
        # generators created here, so a restored state takes effect at the next iter()
        streams = [loader.samples() for loader in self.loaders]
        while True:
            texts, images = [], []
            for stream, share in zip(streams, self.shares):
                for _ in range(share):
                    sample = next(stream)
                    texts.append(self._text_ids(sample["text"]))
                    images.append(sample["image_ids"])
            width = max(len(t) for t in texts)
            yield {"text_ids": paddle.to_tensor(pad_ids(texts, width, self.tok.pad_id)),  # [B, L]
                   "image_ids": paddle.to_tensor(np.stack(images).astype(np.int64))}  # [B, h, w]


class E2EBatches(ShardBatches):
    """ShardBatches plus "images" [B, 3, S, S] in [-1, 1]: the gold images of the rows.

    Same order, text choice and state as ShardBatches (the loop is the parent's, with the image
    read added), so switching a run between the two stages keeps its data position meaning."""

    def __init__(self, *args: Any, image_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_size = image_size

    def _batch(self, items: list[int]) -> dict[str, paddle.Tensor]:
        batch = super()._batch(items)
        images = []
        for i in items:
            rec = self.shards[i]
            if "image" not in rec.meta:
                raise ConfigError("token shards without image paths: the end-to-end stage needs the gold "
                                  "images (re-tokenize with tools/tokenize_images.py)")
            images.append(load_image(rec.meta["image"], self.image_size))
        batch["images"] = paddle.to_tensor(np.stack(images).astype(np.float32))
        return batch
