"""Stage `vilg`: both directions of ERNIE-ViLG on token shards.

Every step runs the text-to-image stream and the image-to-text stream of the same batch through the
one shared model and minimises L = L_txt2img + L_img2txt (Eq. 3); both terms are logged.

`resolve` fills the derived sizes (`Model.text_vocab_size`, `image_vocab_size`, `image_grid` left
at 0) from the vocab file and the token shards, and `Data.tokenizer_ckpt` / `Data.image_size`
from the shards' info, before anything is built, so the config the Trainer saves is complete.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import paddle

from ernie_vilg.checkpoint_io import copy_loadable, has_weights
from ernie_vilg.config import Config, ConfigError
from ernie_vilg.data.pair_batches import ShardBatches, StreamBatches
from ernie_vilg.models.guidance import I2T_IMAGE_KEY, T2I_TEXT_KEY, ConditionDropper
from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG, check_model_config, flops_per_token
from ernie_vilg.stages.spec import ExportGraph
from ernie_vilg.training.module import StepContext, TrainModule

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.txt"
TOKENIZER_DIR = "image_tokenizer"  # copy of the image tokenizer checkpoint inside a vilg checkpoint
EXTRAS_FILE = "vilg.json"


def fill_model_sizes(cfg: Config, text_vocab_size: int, grid: int, codebook_size: int) -> None:
    """Fill the 0 (= derive) Model fields of `cfg` (a resolver's own copy) and check the explicit
    ones against the data."""
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


def vocab_size(path: str | Path) -> int:
    from ernie_vilg.text.tokenizer import TextTokenizer

    return TextTokenizer(path).vocab_size


def resolve(cfg: Config) -> Config:
    """A copy of `cfg` with the model sizes of its vocab and shards filled in."""
    from ernie_vilg.data.token_shards import read_shard_info

    if not cfg.Data.vocab_file:
        raise ConfigError("Data.vocab_file is empty (build one with tools/build_vocab.py)")
    if not cfg.Data.train_shards:
        raise ConfigError("Data.train_shards is empty (write shards with tools/tokenize_images.py)")
    out = copy.deepcopy(cfg)
    info = read_shard_info(cfg.Data.train_shards)
    if not out.Data.tokenizer_ckpt:
        out.Data.tokenizer_ckpt = str(info.get("tokenizer_ckpt", ""))
    if info.get("image_size"):  # the pixels the token grid stands for (the tools resize inputs to it)
        out.Data.image_size = int(info["image_size"])
    fill_model_sizes(out, vocab_size(out.Data.vocab_file), int(info["grid"]), int(info["codebook_size"]))
    return out


def build_bare_model(cfg: Config, ckpt_dir: Optional[Path] = None) -> ErnieViLG:
    """ErnieViLG of the resolved `cfg.Model` (vilg, caption fine-tuning and VQA checkpoints)."""
    try:
        check_model_config(cfg.Model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ErnieViLG(cfg.Model)


class _Logits(paddle.nn.Layer):
    def __init__(self, model: paddle.nn.Layer, direction: Direction) -> None:
        super().__init__()
        self.model, self.direction = model, direction

    def forward(self, text_ids: paddle.Tensor, image_ids: paddle.Tensor) -> paddle.Tensor:
        return self.model(text_ids, image_ids, self.direction)


def export_logits(model: ErnieViLG, cfg: Config, batch_size: int) -> list[ExportGraph]:
    """`txt2img_logits` and `img2txt_logits`: teacher-forced full streams. The target segment is
    causal, so row k depends only on the source and the targets before k: one call with the tokens
    generated so far is one uncached decoding step. B and L are fixed (the model reshapes by B)."""
    m = cfg.Model
    L, n = m.max_text_len, m.image_grid ** 2
    specs = [paddle.static.InputSpec([batch_size, L], "int64", "text_ids"),
             paddle.static.InputSpec([batch_size, n], "int64", "image_ids")]
    ins = [{"name": "text_ids", "shape": [batch_size, L], "dtype": "int64"},
           {"name": "image_ids", "shape": [batch_size, n], "dtype": "int64"}]
    return [
        ExportGraph("txt2img_logits", _Logits(model, Direction.TXT2IMG), specs, ins,
                    [{"name": "logits", "shape": [batch_size, n, m.image_vocab_size], "dtype": "float32"}],
                    "row k: logits of image token k given the text and image_ids[:, :k] (one uncached step)"),
        ExportGraph("img2txt_logits", _Logits(model, Direction.IMG2TXT), specs, ins,
                    [{"name": "logits", "shape": [batch_size, L - 1, m.text_vocab_size], "dtype": "float32"}],
                    "row j: logits of text token j + 1 given the image and text_ids[:, :j + 1]"),
    ]


class VilgTrainModule(TrainModule):
    name = "vilg"

    def __init__(self, cfg: Config) -> None:
        from ernie_vilg.data.token_shards import TokenShards
        from ernie_vilg.text.tokenizer import TextTokenizer

        super().__init__(cfg)
        self.text_tokenizer = TextTokenizer(cfg.Data.vocab_file)
        # the training rows are streamed (train_batches); validation rows are held in memory
        self.val_shards = TokenShards(cfg.Data.val_shards) if cfg.Data.val_shards else None
        self.criterion = VilgCriterion(self.text_tokenizer.pad_id, cfg.Train.txt2img_weight, cfg.Train.img2txt_weight,
                                       cfg.Train.loss_chunk_tokens)
        self._image_tokenizer: Any = None
        self._tokenizer_missing = False
        self._cond_dropper: Optional[ConditionDropper] = None

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

    def losses(self, model: Any, batch: dict[str, paddle.Tensor]):
        """Both directions' losses; `model` is a StepContext (training) or the bare model."""
        text_ids, image_ids = batch["text_ids"], batch["image_ids"]
        # classifier-free guidance (models/guidance.py): each stream may get its own, partly
        # nulled, condition; the targets are always the real image / text
        return bidirectional_loss(model, self.criterion, text_ids, image_ids, batch.get(T2I_TEXT_KEY),
                                  batch.get(I2T_IMAGE_KEY))

    def with_null_conditions(self, ctx: StepContext, batch: dict[str, paddle.Tensor]) -> dict[str, paddle.Tensor]:
        """The batch with each stream's partly nulled condition for classifier-free guidance
        (`Train.cond_drop` > 0; models/guidance.py), or the batch as it is."""
        if self.cfg.Train.cond_drop <= 0:
            return batch
        if self._cond_dropper is None:
            tok = self.text_tokenizer
            self._cond_dropper = ConditionDropper(self.cfg.Train.cond_drop, self.cfg.Global.seed, tok.cls_id,
                                                  tok.sep_id, tok.pad_id, ctx.rank)
        return self._cond_dropper(batch, ctx.step)

    def training_step(self, ctx: StepContext, batch: dict[str, paddle.Tensor]) -> tuple[paddle.Tensor, dict[str, float]]:
        loss = self.losses(ctx, self.with_null_conditions(ctx, batch))
        return loss.total, {"loss_txt2img": float(loss.txt2img), "loss_img2txt": float(loss.img2txt)}

    def validate(self, model: ErnieViLG, step: int) -> dict[str, float]:
        if self.val_shards is None:
            return {}
        from ernie_vilg.generation.evaluate import evaluate_model

        count = min(self.cfg.Train.eval_samples, len(self.val_shards))

        def losses(batch: dict[str, paddle.Tensor]) -> dict[str, float]:
            loss = self.losses(model, batch)
            return {"val_loss_txt2img": float(loss.txt2img), "val_loss_img2txt": float(loss.img2txt)}

        metrics = self.mean_val_losses(self.val_batches(), count, losses)
        # a few items decoded in both directions: captions (BLEU etc.), images (shapes judge)
        metrics.update(evaluate_model(model, self.text_tokenizer, self.image_tokenizer(), self.val_shards,
                                      max_items=min(count, 16), cfg=self.cfg, seed=self.cfg.Global.seed))
        return metrics

    def val_batches(self) -> ShardBatches:
        """Validation batches in a fixed order (the VQA stage's carry its question prefixes)."""
        return ShardBatches(self.val_shards, self.text_tokenizer, self.cfg.Data.batch_size,
                            self.cfg.Data.max_text_len, self.cfg.Global.seed)

    @staticmethod
    def mean_val_losses(batches: ShardBatches, count: int,
                        losses: Callable[[dict[str, paddle.Tensor]], dict[str, float]]) -> dict[str, float]:
        """Item-weighted means of `losses(batch)` over the first `count` validation items (one
        epoch at most): the validation-loss loop of every pair stage."""
        sums: dict[str, float] = {}
        seen = 0
        for batch in batches:
            n = int(batch["text_ids"].shape[0])
            for key, value in losses(batch).items():
                sums[key] = sums.get(key, 0.0) + value * n
            seen += n
            if seen >= count or batches.epoch > 0:
                break
        return {k: v / max(seen, 1) for k, v in sums.items()}

    def tokens(self, batch: dict[str, paddle.Tensor]) -> Optional[int]:
        """Stream tokens of the step: both directions' streams, text + image (the unit of
        `flops_per_token`)."""
        text, image = batch["text_ids"], batch["image_ids"]
        b = int(text.shape[0])
        return 2 * b * (int(text.shape[1]) + int(image.size) // b)

    def flops_per_token(self) -> Optional[float]:
        return float(flops_per_token(self.cfg.Model))

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
        if src is not None and has_weights(src):
            copy_loadable(src, ckpt_dir / TOKENIZER_DIR)  # what load_tokenizer needs
            extras["image_tokenizer"] = TOKENIZER_DIR
        (ckpt_dir / EXTRAS_FILE).write_text(json.dumps(extras, ensure_ascii=False, indent=1), encoding="utf-8")

    # ---------------------------------------------------------------- helpers
    def image_tokenizer(self) -> Any:
        """The frozen image tokenizer for validation decoding, or None when unavailable."""
        if self._image_tokenizer is None and not self._tokenizer_missing:
            path = Path(self.cfg.Data.tokenizer_ckpt)
            if self.cfg.Data.tokenizer_ckpt and has_weights(path):
                from ernie_vilg.vq.registry import load_tokenizer

                self._image_tokenizer = load_tokenizer(path)
            else:
                log.warning("no image tokenizer at %r: generated images are not judged", str(path))
                self._tokenizer_missing = True
        return self._image_tokenizer
