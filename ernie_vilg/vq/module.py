"""Stage 1 as a TrainModule: the image tokenizer trained by the project's one Trainer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import paddle

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.data.images import ImageBatches
from ernie_vilg.data.manifest import read_manifest
from ernie_vilg.vq.base import ImageTokenizer, build_tokenizer
from ernie_vilg.vq.evaluate import evaluate_records
from ernie_vilg.vq.losses import VQVAELoss

TOKENIZER_INFO_FILE = "tokenizer.json"


def _unwrap(model: paddle.nn.Layer) -> ImageTokenizer:
    # paddle.DataParallel keeps the wrapped layer in `_layers`; metrics need the tokenizer API
    return getattr(model, "_layers", model)


class ImageTokenizerStage:
    """What every tokenizer stage (vq, vqgan, dvae) shares: image batches from Data.train_manifest
    and validation by reconstruction metrics on the first Train.eval_samples val images."""

    name = "tokenizer"
    cfg: Config
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
        return evaluate_records(_unwrap(model), self._val_records, d.image_size, d.batch_size)

    def validation_media(self, model: paddle.nn.Layer, step: int) -> Any:
        """Originals over reconstructions of the first val images (VisualDL, OUTPUT/samples)."""
        if not self._val_records:
            return None
        from ernie_vilg.vq.evaluate import reconstruction_media

        return reconstruction_media(_unwrap(model), self._val_records, self.cfg.Data.image_size)


class VQTrainModule(ImageTokenizerStage):
    name = "vq"

    def __init__(self, cfg: Config) -> None:
        if cfg.VQ.kind != "vqvae":
            # VQGAN / dVAE bring their own losses with their issue
            raise ConfigError(f"VQ.kind: the vq stage trains only 'vqvae' so far, got {cfg.VQ.kind!r}")
        self.cfg = cfg
        self.loss = VQVAELoss()
        self._val_records = None  # read once, on first validation

    def build_model(self) -> paddle.nn.Layer:
        paddle.seed(self.cfg.Global.seed)
        model = build_tokenizer(self.cfg.VQ)
        model.grid_size(self.cfg.Data.image_size)  # fail now if the image size does not divide by f
        return model

    def training_step(self, model: paddle.nn.Layer, batch: dict[str, Any], step: int) -> tuple[paddle.Tensor, dict[str, float]]:
        images = paddle.to_tensor(batch["images"], dtype="float32")  # [B, 3, S, S] in [-1, 1]
        loss, logs = self.loss(images, model(images))
        logs.update(_unwrap(model).quantizer.usage_stats())  # usage across steps, not just this batch
        return loss, logs

    def save_extras(self, model: paddle.nn.Layer, ckpt_dir: Path) -> None:
        # the config + weights already rebuild the tokenizer; this small summary lets other
        # stages read the grid and vocabulary sizes without building the network
        tok = _unwrap(model)
        info = {
            "kind": self.cfg.VQ.kind,
            "codebook_size": tok.codebook_size,
            "downsample_factor": tok.downsample_factor,
            "image_size": self.cfg.Data.image_size,
            "grid_size": tok.grid_size(self.cfg.Data.image_size),
        }
        (Path(ckpt_dir) / TOKENIZER_INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
