"""The "vilg" training stage: both directions of ERNIE-ViLG on token shards (TrainModule protocol).

Every step runs the text-to-image stream and the image-to-text stream of the same batch through the
one shared model and minimises L = L_txt2img + L_img2txt (Eq. 3); both terms are logged.

Derived sizes (`Model.text_vocab_size`, `image_vocab_size`, `image_grid` left at 0) are filled in
from the vocab file and the token shards once, when the module is created, before any model is
built, so the config the Trainer saves is complete.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import paddle

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.models.guidance import I2T_IMAGE_KEY, T2I_TEXT_KEY, ConditionDropper
from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG
from ernie_vilg.text.tokenizer import pad_ids

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.txt"
TOKENIZER_DIR = "image_tokenizer"  # copy of the image tokenizer checkpoint inside a vilg checkpoint
EXTRAS_FILE = "vilg.json"
TEXT_CACHE_SIZE = 200_000  # encoded texts kept by StreamBatches (small corpora fit whole)


def resolve_model_sizes(cfg: Config, text_vocab_size: int, grid: int, codebook_size: int) -> None:
    """Fill the 0 (= derive) Model fields and check the explicit ones against the data."""
    m = cfg.Model
    for key, actual in (("text_vocab_size", text_vocab_size), ("image_grid", grid),
                        ("image_vocab_size", codebook_size)):
        value = getattr(m, key)
        if value == 0:
            setattr(m, key, actual)
        elif value != actual:
            raise ConfigError(f"Model.{key}={value} but the data says {actual}")
    if cfg.Data.max_text_len > m.max_text_len:
        raise ConfigError(f"Data.max_text_len={cfg.Data.max_text_len} exceeds Model.max_text_len={m.max_text_len}")


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


class VilgTrainModule:
    name = "vilg"

    def __init__(self, cfg: Config) -> None:
        from ernie_vilg.data.token_shards import TokenShards, read_shard_info
        from ernie_vilg.text.tokenizer import TextTokenizer

        self.cfg = cfg
        if not cfg.Data.vocab_file:
            raise ConfigError("Data.vocab_file is empty (build one with tools/build_vocab.py)")
        if not cfg.Data.train_shards:
            raise ConfigError("Data.train_shards is empty (write shards with tools/tokenize_images.py)")
        self.text_tokenizer = TextTokenizer(cfg.Data.vocab_file)
        # the training rows are streamed (train_batches); only their info.json is read here
        info = read_shard_info(cfg.Data.train_shards)
        self.val_shards = TokenShards(cfg.Data.val_shards) if cfg.Data.val_shards else None
        if not cfg.Data.tokenizer_ckpt:
            cfg.Data.tokenizer_ckpt = str(info.get("tokenizer_ckpt", ""))
        resolve_model_sizes(cfg, self.text_tokenizer.vocab_size, int(info["grid"]), int(info["codebook_size"]))
        self.criterion = VilgCriterion(self.text_tokenizer.pad_id, cfg.Train.txt2img_weight, cfg.Train.img2txt_weight,
                                       cfg.Train.loss_chunk_tokens)
        self._image_tokenizer: Any = None
        self._tokenizer_missing = False

    @functools.cached_property
    def train_shards(self) -> Any:
        """Every training row in memory (random access), loaded on first use: the stages whose
        batches are `ShardBatches` (end-to-end) need it; the vilg stage streams its rows.
        (A cached_property, so subclasses may still assign the attribute.)"""
        from ernie_vilg.data.token_shards import TokenShards

        return TokenShards(self.cfg.Data.train_shards)

    # ---------------------------------------------------------------- TrainModule
    def build_model(self) -> ErnieViLG:
        paddle.seed(self.cfg.Global.seed)
        dist = self.cfg.Distributed
        return ErnieViLG(self.cfg.Model, recompute=dist.recompute, recompute_every_k=dist.recompute_every_k)

    def train_batches(self, rank: int, world_size: int) -> StreamBatches:
        d = self.cfg.Data
        return StreamBatches(d.train_shards, self.text_tokenizer, d.batch_size, d.max_text_len, self.cfg.Global.seed,
                             rank, world_size, d.stream_partitions, d.shuffle_buffer)

    def losses(self, model: ErnieViLG, batch: dict[str, paddle.Tensor]):
        text_ids, image_ids = batch["text_ids"], batch["image_ids"]
        # classifier-free guidance (models/guidance.py): each stream may get its own, partly
        # nulled, condition; the targets are always the real image / text
        return bidirectional_loss(model, self.criterion, text_ids, image_ids, batch.get(T2I_TEXT_KEY),
                                  batch.get(I2T_IMAGE_KEY))

    def training_step(self, model: ErnieViLG, batch: dict[str, paddle.Tensor], step: int
                      ) -> tuple[paddle.Tensor, dict[str, float]]:
        if self.cfg.Train.cond_drop > 0:  # null conditions for classifier-free guidance
            if getattr(self, "_cond_dropper", None) is None:
                tok = self.text_tokenizer
                self._cond_dropper = ConditionDropper(self.cfg.Train.cond_drop, self.cfg.Global.seed, tok.cls_id,
                                                      tok.sep_id, tok.pad_id, paddle.distributed.get_rank())
            batch = self._cond_dropper(batch, step)
        loss = self.losses(model, batch)
        return loss.total, {"loss_txt2img": float(loss.txt2img), "loss_img2txt": float(loss.img2txt)}

    def validate(self, model: ErnieViLG, step: int) -> dict[str, float]:
        if self.val_shards is None:
            return {}
        from ernie_vilg.generation.evaluate import evaluate_model

        count = min(self.cfg.Train.eval_samples, len(self.val_shards))
        batches = ShardBatches(self.val_shards, self.text_tokenizer, self.cfg.Data.batch_size,
                               self.cfg.Data.max_text_len, self.cfg.Global.seed)
        sums, seen = {"val_loss_txt2img": 0.0, "val_loss_img2txt": 0.0}, 0
        for batch in batches:
            n = batch["text_ids"].shape[0]
            loss = self.losses(model, batch)
            sums["val_loss_txt2img"] += float(loss.txt2img) * n
            sums["val_loss_img2txt"] += float(loss.img2txt) * n
            seen += n
            if seen >= count or batches.epoch > 0:
                break
        metrics = {k: v / seen for k, v in sums.items()}
        # a few items decoded in both directions: captions (BLEU etc.), images (shapes judge)
        metrics.update(evaluate_model(model, self.text_tokenizer, self.image_tokenizer(), self.val_shards,
                                      max_items=min(count, 16), cfg=self.cfg, seed=self.cfg.Global.seed))
        return metrics

    def validation_media(self, model: ErnieViLG, step: int) -> Any:
        """Fixed val prompts: true vs generated images, captions beside references (VisualDL)."""
        # the subclasses whose model or shards are not plain text <-> image (e2e's reconstructor,
        # VQA's question/answer texts) show no media
        if self.val_shards is None or self.name not in ("vilg", "caption_finetune"):
            return None
        from ernie_vilg.generation.evaluate import validation_media

        return validation_media(model, self.text_tokenizer, self.image_tokenizer(), self.val_shards, self.cfg,
                                seed=self.cfg.Global.seed)

    def save_extras(self, model: ErnieViLG, ckpt_dir: Path) -> None:
        ckpt_dir = Path(ckpt_dir)
        shutil.copyfile(self.cfg.Data.vocab_file, ckpt_dir / VOCAB_FILE)
        extras: dict[str, Any] = {"vocab": VOCAB_FILE, "image_tokenizer": None,
                                  "tokenizer_source": self.cfg.Data.tokenizer_ckpt or None}
        src = Path(self.cfg.Data.tokenizer_ckpt) if self.cfg.Data.tokenizer_ckpt else None
        if src is not None and (src / "model.pdparams").is_file():
            dst = ckpt_dir / TOKENIZER_DIR
            dst.mkdir(exist_ok=True)
            for name in ("model.pdparams", "config.yaml", "meta.json"):  # what load_tokenizer needs
                if (src / name).is_file():
                    shutil.copyfile(src / name, dst / name)
            extras["image_tokenizer"] = TOKENIZER_DIR
        (ckpt_dir / EXTRAS_FILE).write_text(json.dumps(extras, ensure_ascii=False, indent=1), encoding="utf-8")

    # ---------------------------------------------------------------- helpers
    def image_tokenizer(self) -> Any:
        """The frozen image tokenizer for validation decoding, or None when unavailable."""
        if self._image_tokenizer is None and not self._tokenizer_missing:
            path = Path(self.cfg.Data.tokenizer_ckpt)
            if self.cfg.Data.tokenizer_ckpt and (path / "model.pdparams").is_file():
                from ernie_vilg.vq.base import load_tokenizer

                self._image_tokenizer = load_tokenizer(path)
            else:
                log.warning("no image tokenizer at %r: generated images are not judged", str(path))
                self._tokenizer_missing = True
        return self._image_tokenizer
