"""Stage `vqgan`: the VQGAN tokenizer (VQ.kind vqgan / vqgan_gumbel) under the one Trainer.

A GAN needs two opposed updates per step. The stage declares its discriminator as an extra network
(`extra_optimizers`), which the Trainer owns like the model's optimizer (built, reduced over
data-parallel ranks, saved as `discriminator.pdparams` / `.pdopt` in every checkpoint, resumed):

  1. generator forward: x_hat = VQGAN(x)                                  (through the wrapper)
  2. discriminator update (from VQGAN.disc_start on): `ctx.step_extra("discriminator",
     d_loss(x, sg[x_hat]))`, at disc_lr_mult x the scheduled lr;
  3. generator loss: nll + adaptive weight x (-D(x_hat)) + codebook, with the discriminator's
     parameters frozen (stop_gradient) so the model's backward never touches them.

Why not one combined loss: the generator term -D(x_hat) pushes D's parameters the wrong way, and
the model's weights must stay exactly the tokenizer's for `load_tokenizer`. With gradient
accumulation the discriminator steps once per micro batch.
"""
from __future__ import annotations

from typing import Any

import paddle

from ernie_vilg.config import Config
from ernie_vilg.stages.vq import ImageTokenizerStage, resolve_tokenizer
from ernie_vilg.training.module import ExtraOptimizer, StepContext
from ernie_vilg.vq.dvae import gumbel_schedule
from ernie_vilg.vq.gan_losses import PatchDiscriminator, VQGANLoss, hinge_d_loss
from ernie_vilg.vq.vqgan import QUANTIZERS, VQGAN

DISCRIMINATOR = "discriminator"  # the extra network's name (its checkpoint files are named after it)


def _set_trainable(layer: paddle.nn.Layer, trainable: bool) -> None:
    for p in layer.parameters():
        p.stop_gradient = not trainable


class VQGANTrainModule(ImageTokenizerStage):
    name = "vqgan"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.loss = VQGANLoss.from_config(cfg.VQGAN)
        paddle.seed(cfg.Global.seed + 1)  # the discriminator's init does not shift the tokenizer's
        g = cfg.VQGAN
        self.discriminator = PatchDiscriminator(cfg.VQ.in_channels, g.disc_channels, g.disc_layers)

    def extra_optimizers(self) -> dict[str, ExtraOptimizer]:
        return {DISCRIMINATOR: ExtraOptimizer(self.discriminator, lr_mult=self.cfg.VQGAN.disc_lr_mult)}

    def build_model(self) -> VQGAN:
        paddle.seed(self.cfg.Global.seed)
        return VQGAN(self.cfg.VQ)

    def gumbel_schedule(self, step: int) -> tuple[float, float]:
        return gumbel_schedule(self.cfg.DVAE, step)

    def training_step(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[paddle.Tensor, dict[str, float]]:
        images = paddle.to_tensor(batch["images"], dtype="float32")  # [B, 3, S, S] in [-1, 1]
        temperature, kl_weight = self.gumbel_schedule(ctx.step)
        out = ctx(images, temperature, kl_weight)
        logs: dict[str, float] = {}
        use_disc = ctx.step >= self.cfg.VQGAN.disc_start
        if use_disc:
            logs.update(self.discriminator_step(ctx, images, out.recon.detach()))
        _set_trainable(self.discriminator, False)  # the generator's backward stops at the images
        tok: VQGAN = ctx.model
        loss, gen_logs = self.loss(images, out.recon, out.quant_loss, tok.get_last_layer(),
                                   self.discriminator if use_disc else None, ctx.step)
        logs.update(gen_logs)
        logs.update(perplexity=float(out.info.perplexity), codes_used=float(out.info.codes_used))
        logs.update(tok.usage_stats())
        if tok.gumbel:
            logs.update(temperature=temperature, kl_weight=kl_weight)
        return loss, logs

    def discriminator_step(self, ctx: StepContext, images: paddle.Tensor, fake: paddle.Tensor) -> dict[str, float]:
        """One hinge-loss update of the discriminator on real images and detached reconstructions."""
        _set_trainable(self.discriminator, True)
        self.discriminator.train()
        logits_real, logits_fake = self.discriminator(images), self.discriminator(fake)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        ctx.step_extra(DISCRIMINATOR, d_loss)
        return {"d_loss": float(d_loss), "logits_real": float(logits_real.mean()),
                "logits_fake": float(logits_fake.mean())}


def resolve(cfg: Config) -> Config:
    return resolve_tokenizer(cfg, QUANTIZERS)
