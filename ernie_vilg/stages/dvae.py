"""Stage `dvae`: the DALL-E discrete VAE (VQ.kind dvae) under the one Trainer.

The loss and the NOT-DALL-E training aids (k-means init, encoder freeze, dead-code splits) are in
`vq/dvae_train.py`; docs/tokenizers.md, "dVAE", says why each exists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import paddle

from ernie_vilg.checkpoint_io import latest_checkpoint
from ernie_vilg.config import Config
from ernie_vilg.data.images import ImageBatches
from ernie_vilg.stages.vq import ImageTokenizerStage, resolve_tokenizer
from ernie_vilg.training.module import StepContext
from ernie_vilg.vq.dvae import DVAE, gumbel_schedule
from ernie_vilg.vq.dvae_train import DVAELoss, apply_code_splits, kmeans_init_logits, plan_code_splits


class DVAETrainModule(ImageTokenizerStage):
    name = "dvae"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.loss = DVAELoss(cfg.DVAE, cfg.VQ.downsample_factor)
        self._since_used = None  # steps since each code was last an argmax (dead_code_steps)
        self._rng = None
        self._pending_splits: list = []

    def build_model(self) -> DVAE:
        paddle.seed(self.cfg.Global.seed)
        model = DVAE(self.cfg.VQ)
        lr_scale = self.cfg.DVAE.encoder_lr_scale
        if lr_scale != 1.0:  # per-parameter lr multiplier (Paddle's optimize_attr), not saved
            for param in model.encoder.parameters():
                param.optimize_attr["learning_rate"] = lr_scale
        n = self.cfg.DVAE.kmeans_init_batches
        if n > 0 and not self._resuming():
            # once, on a fresh run: a resumed run loads the (k-means-initialised) saved weights
            batches = iter(ImageBatches(self.cfg.Data.train_manifest, self.cfg.Data.image_size,
                                        self.cfg.Data.batch_size, self.cfg.Global.seed + 1))
            images = [paddle.to_tensor(next(batches)["images"], dtype="float32") for _ in range(n)]
            kmeans_init_logits(model, images, seed=self.cfg.Global.seed,
                               logit_std=self.cfg.DVAE.kmeans_logit_std)
        return model

    def _resuming(self) -> bool:
        return bool(self.cfg.Train.resume) and latest_checkpoint(
            Path(self.cfg.Global.output_dir) / "checkpoints") is not None

    def schedule(self, step: int) -> tuple[float, float]:
        return gumbel_schedule(self.cfg.DVAE, step)

    def training_step(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[paddle.Tensor, dict[str, float]]:
        images = paddle.to_tensor(batch["images"], dtype="float32")
        inner, step = ctx.model, ctx.step
        if self._pending_splits:
            apply_code_splits(inner, self._pending_splits)
            self._pending_splits = []
        temperature, kl_weight = self.schedule(step)
        freeze = step < self.cfg.DVAE.encoder_freeze_steps
        out = ctx(images, temperature, self.cfg.DVAE.straight_through, freeze_encoder=freeze)
        loss, logs = self.loss(images, out, kl_weight)
        counts = paddle.bincount(out.ids.flatten(), minlength=self.cfg.VQ.codebook_size)
        logs.update(temperature=temperature, kl_weight=kl_weight,
                    codes_used=float((counts > 0).astype("float32").mean()))
        n_dead = self.cfg.DVAE.dead_code_steps
        if n_dead > 0:  # not DALL-E; single process only (each rank would split its own codes)
            if self._since_used is None:
                self._since_used = np.zeros(self.cfg.VQ.codebook_size, dtype=np.int64)
                self._rng = np.random.default_rng(self.cfg.Global.seed)
            used = counts.numpy() > 0
            self._since_used = np.where(used, 0, self._since_used + 1)
            dead = self._since_used >= n_dead
            self._pending_splits = plan_code_splits(inner, images, out, dead, self._rng)
            self._since_used[[split[0] for split in self._pending_splits]] = 0
            logs["codes_restarted"] = float(len(self._pending_splits))
        return loss, logs


def resolve(cfg: Config) -> Config:
    return resolve_tokenizer(cfg, ("dvae",))
