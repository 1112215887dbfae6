"""Stage `vqgan`: the VQGAN tokenizer (VQ.kind vqgan / vqgan_gumbel) under the one Trainer.

The Trainer has one optimizer and calls `optimizer.step()` once per step, but a GAN needs two
opposed updates. Design: **the module owns the discriminator and its own AdamW** and steps it
inside `training_step`, before the generator's loss is built:

  1. generator forward: x_hat = VQGAN(x)                                  (Trainer's model)
  2. discriminator update (from VQGAN.disc_start on): d_loss(x, sg[x_hat]).backward(); the
     discriminator's optimizer steps at disc_lr_mult x the scheduled lr; its gradients are
     all-reduced first under data parallelism so the replicas stay equal;
  3. generator loss: nll + adaptive weight x (-D(x_hat)) + codebook, with the discriminator's
     parameters frozen (stop_gradient) so the Trainer's backward never touches them.

Why not a single combined loss: the generator term -D(x_hat) pushes D's parameters the wrong way,
and the Trainer's optimizer would then also own (and checkpoint) D inside the tokenizer's weights,
which must stay exactly the tokenizer's for `load_tokenizer`. Consequences, documented: the
discriminator and its optimizer state are saved next to the weights (`discriminator.pdparams`,
`discriminator.pdopt`, via `save_extras`) and reloaded on the first step of a resumed run from the
newest checkpoint (the one the Trainer resumed from); with gradient accumulation the
discriminator steps once per micro batch.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import paddle
import paddle.distributed as dist

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.training.checkpoint import optimizer_state_from_structured, optimizer_state_to_structured
from ernie_vilg.vq.dvae import gumbel_schedule
from ernie_vilg.vq.gan_losses import PatchDiscriminator, VQGANLoss, hinge_d_loss
from ernie_vilg.vq.module import ImageTokenizerStage
from ernie_vilg.vq.vqgan import QUANTIZERS, VQGAN

log = logging.getLogger(__name__)
TOKENIZER_INFO_FILE = "tokenizer.json"  # same file as the vq stage writes
DISC_WEIGHTS_FILE = "discriminator.pdparams"
DISC_OPT_FILE = "discriminator.pdopt"


def _unwrap(model: paddle.nn.Layer) -> Any:
    return getattr(model, "_layers", model)


def _set_trainable(layer: paddle.nn.Layer, trainable: bool) -> None:
    for p in layer.parameters():
        p.stop_gradient = not trainable


def write_tokenizer_info(cfg: Config, tokenizer: Any, ckpt_dir: Path) -> None:
    """The small summary other stages read (same keys as the vq stage's tokenizer.json)."""
    info = {"kind": cfg.VQ.kind, "codebook_size": tokenizer.codebook_size,
            "downsample_factor": tokenizer.downsample_factor, "image_size": cfg.Data.image_size,
            "grid_size": tokenizer.grid_size(cfg.Data.image_size)}
    (Path(ckpt_dir) / TOKENIZER_INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")


class VQGANTrainModule(ImageTokenizerStage):
    name = "vqgan"

    def __init__(self, cfg: Config) -> None:
        if cfg.VQ.kind not in QUANTIZERS:
            raise ConfigError(f"VQ.kind: the vqgan stage trains {QUANTIZERS}, got {cfg.VQ.kind!r}")
        self.cfg = cfg
        self.loss = VQGANLoss.from_config(cfg.VQGAN)
        paddle.seed(cfg.Global.seed + 1)  # the discriminator's init does not shift the tokenizer's
        g = cfg.VQGAN
        self.discriminator = PatchDiscriminator(cfg.VQ.in_channels, g.disc_channels, g.disc_layers)
        o = cfg.Optimizer
        self.disc_optimizer = paddle.optimizer.AdamW(
            learning_rate=o.lr * g.disc_lr_mult, parameters=self.discriminator.parameters(),
            beta1=o.beta1, beta2=o.beta2, epsilon=o.eps, weight_decay=0.0)
        self._resume_checked = False
        self._val_records = None

    # ---- TrainModule --------------------------------------------------------------------
    def build_model(self) -> VQGAN:
        paddle.seed(self.cfg.Global.seed)
        model = VQGAN(self.cfg.VQ)
        model.grid_size(self.cfg.Data.image_size)
        return model

    def gumbel_schedule(self, step: int) -> tuple[float, float]:
        return gumbel_schedule(self.cfg.DVAE, step)

    def training_step(self, model: paddle.nn.Layer, batch: dict[str, Any], step: int
                      ) -> tuple[paddle.Tensor, dict[str, float]]:
        self._maybe_resume_discriminator()
        images = paddle.to_tensor(batch["images"], dtype="float32")  # [B, 3, S, S] in [-1, 1]
        temperature, kl_weight = self.gumbel_schedule(step)
        out = model(images, temperature, kl_weight)
        logs: dict[str, float] = {}
        use_disc = step >= self.cfg.VQGAN.disc_start
        if use_disc:
            logs.update(self.discriminator_step(images, out.recon.detach(), step))
        _set_trainable(self.discriminator, False)  # the generator's backward stops at the images
        loss, gen_logs = self.loss(images, out.recon, out.quant_loss, _unwrap(model).get_last_layer(),
                                   self.discriminator if use_disc else None, step)
        logs.update(gen_logs)
        logs.update(perplexity=float(out.info.perplexity), codes_used=float(out.info.codes_used))
        logs.update(_unwrap(model).usage_stats())
        if _unwrap(model).gumbel:
            logs.update(temperature=temperature, kl_weight=kl_weight)
        return loss, logs

    def discriminator_step(self, images: paddle.Tensor, fake: paddle.Tensor, step: int) -> dict[str, float]:
        """One hinge-loss update of the discriminator on real images and detached reconstructions."""
        from ernie_vilg.training.trainer import learning_rate

        _set_trainable(self.discriminator, True)
        self.discriminator.train()
        self.disc_optimizer.clear_grad()
        logits_real, logits_fake = self.discriminator(images), self.discriminator(fake)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        d_loss.backward()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.discriminator.parameters():  # replicas must take the same step
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.scale_(1.0 / dist.get_world_size())
        self.disc_optimizer.set_lr(learning_rate(step, self.cfg) * self.cfg.VQGAN.disc_lr_mult)
        self.disc_optimizer.step()
        self.disc_optimizer.clear_grad()
        return {"d_loss": float(d_loss), "logits_real": float(logits_real.mean()),
                "logits_fake": float(logits_fake.mean())}

    def save_extras(self, model: paddle.nn.Layer, ckpt_dir: Path) -> None:
        write_tokenizer_info(self.cfg, _unwrap(model), ckpt_dir)
        paddle.save(self.discriminator.state_dict(), str(Path(ckpt_dir) / DISC_WEIGHTS_FILE))
        # keyed by structured names: Paddle's auto names (conv2d_7.w_0) differ between processes
        opt_state = optimizer_state_to_structured(self.disc_optimizer.state_dict(), self.discriminator)
        paddle.save(opt_state, str(Path(ckpt_dir) / DISC_OPT_FILE))

    # ---- resume -------------------------------------------------------------------------
    def _maybe_resume_discriminator(self) -> None:
        """On the first step: reload D from the checkpoint the Trainer resumed from, if any."""
        if self._resume_checked:
            return
        self._resume_checked = True
        if not self.cfg.Train.resume:
            return
        from ernie_vilg.checkpoint_io import latest_checkpoint

        ckpt: Optional[Path] = latest_checkpoint(Path(self.cfg.Global.output_dir) / "checkpoints")
        if ckpt is None or not (ckpt / DISC_WEIGHTS_FILE).is_file():
            return
        from ernie_vilg.safe_pickle import safe_load

        # every pickle goes through the allow-list, also the run's own (docs/security.md)
        self.discriminator.set_state_dict(safe_load(ckpt / DISC_WEIGHTS_FILE))
        if (ckpt / DISC_OPT_FILE).is_file():
            state = safe_load(ckpt / DISC_OPT_FILE)
            self.disc_optimizer.set_state_dict(optimizer_state_from_structured(state, self.discriminator))
        log.info("discriminator resumed from %s", ckpt)
