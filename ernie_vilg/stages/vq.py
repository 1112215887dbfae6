"""Stage `vq`: the VQVAE image tokenizer; and what every tokenizer stage (vq, vqgan, dvae) shares.

Shared: image batches from Data.train_manifest, validation by reconstruction metrics on the first
Train.eval_samples val images, `tokenizer.json` beside the weights, the bare model
(`build_tokenizer(cfg.VQ)`) and the export hook (`vq_decoder`: ids -> images).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import paddle

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.data.images import ImageBatches
from ernie_vilg.data.manifest import read_manifest
from ernie_vilg.stages.spec import ExportGraph
from ernie_vilg.training.module import StepContext, TrainModule
from ernie_vilg.vq.base import ImageTokenizer, write_tokenizer_info
from ernie_vilg.vq.evaluate import evaluate_records
from ernie_vilg.vq.losses import VQVAELoss
from ernie_vilg.vq.registry import build_tokenizer


def resolve_tokenizer(cfg: Config, kinds: tuple[str, ...]) -> Config:
    """A copy of `cfg`, checked: `VQ.kind` is one `kinds`, the image size divides by the factor."""
    if cfg.VQ.kind not in kinds:
        raise ConfigError(f"VQ.kind: the {cfg.Global.stage} stage trains {', '.join(kinds)}, got {cfg.VQ.kind!r}")
    f = cfg.VQ.downsample_factor
    if f < 1 or cfg.Data.image_size % f:
        raise ConfigError(f"Data.image_size={cfg.Data.image_size} is not divisible by VQ.downsample_factor={f}")
    return copy.deepcopy(cfg)


def build_bare_tokenizer(cfg: Config, ckpt_dir: Optional[Path] = None) -> ImageTokenizer:
    """The tokenizer network of `cfg.VQ`, untrained (every tokenizer stage's bare model)."""
    return build_tokenizer(cfg.VQ)


class _VQDecoder(paddle.nn.Layer):
    def __init__(self, tokenizer: ImageTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        # = ImageTokenizer.decode_ids without the eager-only shape checks and no_grad wrapper
        return paddle.clip(self.tokenizer._decode_ids(ids), -1.0, 1.0)


def export_tokenizer(model: ImageTokenizer, cfg: Config, batch_size: int) -> list[ExportGraph]:
    """`vq_decoder`: ids [B, h, w] int64 -> images [B, 3, H, W] in [-1, 1] (any B)."""
    g, size = model.grid_size(cfg.Data.image_size), cfg.Data.image_size
    return [ExportGraph("vq_decoder", _VQDecoder(model), [paddle.static.InputSpec([None, g, g], "int64", "ids")],
                        [{"name": "ids", "shape": [-1, g, g], "dtype": "int64"}],
                        [{"name": "images", "shape": [-1, 3, size, size], "dtype": "float32"}],
                        "image token ids -> images in [-1, 1] (the VQ decoder)")]


class ImageTokenizerStage(TrainModule):
    """Data, validation and extras of every tokenizer stage."""

    _val_records: Any = None  # read once, on first validation

    def train_batches(self, rank: int, world_size: int) -> ImageBatches:
        d = self.cfg.Data
        if not d.train_manifest:
            raise ConfigError(f"Data.train_manifest: required for the {self.name} stage")
        return ImageBatches(d.train_manifest, d.image_size, d.batch_size, self.cfg.Global.seed, rank, world_size,
                            num_workers=d.num_workers)

    def validate(self, model: paddle.nn.Layer, step: int) -> dict[str, float]:
        d = self.cfg.Data
        if not d.val_manifest:
            return {}
        if self._val_records is None:
            self._val_records = read_manifest(d.val_manifest)[: self.cfg.Train.eval_samples]
        return evaluate_records(model, self._val_records, d.image_size, d.batch_size)

    def validation_media(self, model: paddle.nn.Layer, step: int) -> Any:
        """Originals over reconstructions of the first val images (VisualDL, OUTPUT/samples)."""
        if not self._val_records:
            return None
        from ernie_vilg.vq.evaluate import reconstruction_media

        return reconstruction_media(model, self._val_records, self.cfg.Data.image_size)

    def save_extras(self, model: paddle.nn.Layer, ckpt_dir: Path) -> None:
        # the config + weights already rebuild the tokenizer; this small summary lets other
        # stages read the grid and vocabulary sizes without building the network
        write_tokenizer_info(model, self.cfg.Data.image_size, ckpt_dir)


class VQTrainModule(ImageTokenizerStage):
    name = "vq"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.loss = VQVAELoss()

    def build_model(self) -> paddle.nn.Layer:
        paddle.seed(self.cfg.Global.seed)
        return build_tokenizer(self.cfg.VQ)

    def training_step(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[paddle.Tensor, dict[str, float]]:
        images = paddle.to_tensor(batch["images"], dtype="float32")  # [B, 3, S, S] in [-1, 1]
        loss, logs = self.loss(images, ctx(images))
        logs.update(ctx.model.quantizer.usage_stats())  # usage across steps, not just this batch
        return loss, logs


def resolve(cfg: Config) -> Config:
    return resolve_tokenizer(cfg, ("vqvae",))
