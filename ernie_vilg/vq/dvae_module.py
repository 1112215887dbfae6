"""Stage `dvae`: the DALL-E discrete VAE (VQ.kind dvae) under the one Trainer, and its loss.

    loss = recon_nll + kl_weight(step) * KL(q(z|x) || uniform) / (3 f^2)

recon_nll is the mean over pixel values of the logit-Laplace negative log-likelihood (DALL-E):

    x' = map_pixels(x) in [eps, 1 - eps],  y = logit(x'),  decoder gives mu, log b per value
    -log p(x'|mu, b) = log(2 b) + log(x'(1 - x')) + |y - mu| / b

or (DVAE.recon_loss = mse) the mean squared error of the decoded image in [-1, 1]. The KL is the
mean over token positions; dividing it by the 3 f^2 pixel values each token covers puts both
terms on the per-pixel-value scale, i.e. it is DALL-E's summed ELB divided by the number of pixel
values, so DALL-E's beta = 6.6 keeps its meaning. The temperature is cosine-annealed
temp_start -> temp_end over temp_anneal_steps and the KL weight ramps kl_weight_start ->
kl_weight_end over kl_warmup_steps (DALL-E: 1 -> 1/16 over 150k updates, 0 -> 6.6 over 5k).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.config import Config, ConfigError, DVAEConfig
from ernie_vilg.vq.dvae import DVAE, DVAEOutput, gumbel_schedule, kl_to_uniform, map_pixels
from ernie_vilg.vq.gan_module import write_tokenizer_info
from ernie_vilg.vq.module import ImageTokenizerStage

RECON_LOSSES = ("logit_laplace", "mse")


def logit_laplace_nll(images: paddle.Tensor, stats: paddle.Tensor, eps: float) -> paddle.Tensor:
    """Mean NLL of images [B, 3, H, W] in [-1, 1] under the decoder's stats [B, 6, H, W]."""
    x = map_pixels((images + 1.0) * 0.5, eps)  # in [eps, 1 - eps]
    y = paddle.log(x) - paddle.log(1.0 - x)  # logit(x)
    mu, log_b = stats[:, :3], stats[:, 3:]
    nll = log_b + math.log(2.0) + paddle.log(x * (1.0 - x)) + paddle.abs(y - mu) * paddle.exp(-log_b)
    return nll.mean()


class DVAELoss(nn.Layer):
    def __init__(self, cfg: DVAEConfig, downsample_factor: int) -> None:
        super().__init__()
        if cfg.recon_loss not in RECON_LOSSES:
            raise ConfigError(f"DVAE.recon_loss: one of {RECON_LOSSES}, got {cfg.recon_loss!r}")
        self.cfg = cfg
        self.values_per_token = 3 * downsample_factor ** 2

    def forward(self, images: paddle.Tensor, out: DVAEOutput, kl_weight: float) -> tuple[paddle.Tensor, dict[str, float]]:
        if self.cfg.recon_loss == "logit_laplace":
            rec = logit_laplace_nll(images, out.stats, self.cfg.logit_laplace_eps)
        else:
            rec = F.mse_loss(out.recon, images)
        kl = kl_to_uniform(out.logits)
        loss = rec + kl_weight * kl / self.values_per_token
        logs = {"rec_loss": float(rec), "kl": float(kl), "mse": float(F.mse_loss(out.recon.detach(), images))}
        return loss, logs


class DVAETrainModule(ImageTokenizerStage):
    name = "dvae"

    def __init__(self, cfg: Config) -> None:
        if cfg.VQ.kind != "dvae":
            raise ConfigError(f"VQ.kind: the dvae stage trains 'dvae', got {cfg.VQ.kind!r}")
        self.cfg = cfg
        self.loss = DVAELoss(cfg.DVAE, cfg.VQ.downsample_factor)
        self._val_records = None

    def build_model(self) -> DVAE:
        paddle.seed(self.cfg.Global.seed)
        model = DVAE(self.cfg.VQ)
        model.grid_size(self.cfg.Data.image_size)
        return model

    def schedule(self, step: int) -> tuple[float, float]:
        return gumbel_schedule(self.cfg.DVAE, step)

    def training_step(self, model: paddle.nn.Layer, batch: dict[str, Any], step: int
                      ) -> tuple[paddle.Tensor, dict[str, float]]:
        images = paddle.to_tensor(batch["images"], dtype="float32")
        temperature, kl_weight = self.schedule(step)
        out = model(images, temperature, self.cfg.DVAE.straight_through)
        loss, logs = self.loss(images, out, kl_weight)
        counts = paddle.bincount(out.ids.flatten(), minlength=self.cfg.VQ.codebook_size)
        logs.update(temperature=temperature, kl_weight=kl_weight,
                    codes_used=float((counts > 0).astype("float32").mean()))
        return loss, logs

    def save_extras(self, model: paddle.nn.Layer, ckpt_dir: Path) -> None:
        write_tokenizer_info(self.cfg, getattr(model, "_layers", model), ckpt_dir)
