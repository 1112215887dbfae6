"""Stage `vilg_e2e`: the bidirectional model trained end to end with a reconstructor (sec. 3.1.3).

Built on `VilgTrainModule` by subclassing (its data, vocab, size resolution, validation and
extras are reused unchanged); this module adds:

  * the model `ErnieViLGE2E` (ErnieViLG + `e2e` reconstructor initialised from the stage-1
    tokenizer `Data.tokenizer_ckpt`, which must be set: its architecture is the reconstructor's);
  * batches that also carry the gold images (`E2EBatches`, read from each shard row's `image`);
  * the loss gen_weight * L_txt2img + i2t_weight * L_img2txt + rec_weight * L_rec.

Limitation (documented): the hidden states come from `ErnieViLGE2E.txt2img_with_hidden`, called
on the unwrapped model, so under paddle.DataParallel the gradient all-reduce hooks that
`DataParallel.forward` arms are bypassed; this stage is single-process until the model exposes
hidden states from `forward` (see the report of issue 6 for the exact hook).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import paddle

from ernie_vilg.checkpoint_io import load_checkpoint_config
from ernie_vilg.config import Config, ConfigError, E2EConfig
from ernie_vilg.data.pair_batches import E2EBatches
from ernie_vilg.models.e2e import ErnieViLGE2E
from ernie_vilg.models.guidance import I2T_IMAGE_KEY, T2I_TEXT_KEY
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.stages.spec import ExportGraph
from ernie_vilg.stages.vilg import VilgTrainModule, export_logits
from ernie_vilg.stages.vilg import build_bare_model as build_vilg_model
from ernie_vilg.stages.vilg import resolve as resolve_vilg
from ernie_vilg.training.module import StepContext
from ernie_vilg.vq.registry import build_tokenizer, load_tokenizer


def resolve(cfg: Config) -> Config:
    """The vilg sizes and image size, plus the reconstructor's architecture: `VQ` becomes the image
    tokenizer's, so the bare model builds from the config alone."""
    from ernie_vilg.data.token_shards import read_shard_info

    out = resolve_vilg(cfg)
    if not out.Data.tokenizer_ckpt:
        raise ConfigError("Data.tokenizer_ckpt: the end-to-end stage needs the image tokenizer "
                          "(its decoder architecture and weights start the reconstructor)")
    _, tok_cfg = load_checkpoint_config(out.Data.tokenizer_ckpt)
    check_e2e_schedule(out.E2E)
    out.VQ = copy.deepcopy(tok_cfg.VQ)
    if not read_shard_info(out.Data.train_shards).get("image_size"):  # shards older than the image size key
        out.Data.image_size = tok_cfg.Data.image_size
    return out


def reconstructor_lr_scale(e2e: E2EConfig, step: int) -> float:
    """The reconstructor's lr multiplier at `step` (0-based): 0 before `rec_start_step`, then a
    linear ramp to `rec_lr_scale` over `rec_warmup_steps`."""
    if step < e2e.rec_start_step:
        return 0.0
    if e2e.rec_warmup_steps > 0:
        return e2e.rec_lr_scale * min(1.0, (step - e2e.rec_start_step + 1) / e2e.rec_warmup_steps)
    return e2e.rec_lr_scale


def check_e2e_schedule(e2e: E2EConfig) -> None:
    for key in ("rec_lr_scale", "rec_warmup_steps", "rec_start_step"):
        if getattr(e2e, key) < 0:
            raise ConfigError(f"E2E.{key}: must be >= 0, got {getattr(e2e, key)!r}")


def build_bare_model(cfg: Config, ckpt_dir: Optional[Path] = None) -> ErnieViLGE2E:
    """Generator + reconstructor of the resolved config (the reconstructor's decoder has the
    architecture of `cfg.VQ`; its weights come with the checkpoint)."""
    build_vilg_model(cfg)  # the model config's checks
    return ErnieViLGE2E(cfg.Model, build_tokenizer(cfg.VQ), cfg.E2E)


class _Reconstruct(paddle.nn.Layer):
    def __init__(self, model: ErnieViLGE2E) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_ids: paddle.Tensor, image_ids: paddle.Tensor) -> paddle.Tensor:
        return self.model.reconstruct_from_ids(text_ids, image_ids.reshape([image_ids.shape[0], -1]))


def export_e2e(model: ErnieViLGE2E, cfg: Config, batch_size: int) -> list[ExportGraph]:
    """The vilg logits graphs plus `e2e_reconstruct`: (text, image ids) -> the end-to-end
    reconstructor's image in [-1, 1]."""
    graphs = export_logits(model, cfg, batch_size)
    L, n, size = cfg.Model.max_text_len, cfg.Model.image_grid ** 2, cfg.Data.image_size
    specs = [paddle.static.InputSpec([batch_size, L], "int64", "text_ids"),
             paddle.static.InputSpec([batch_size, n], "int64", "image_ids")]
    graphs.append(ExportGraph(
        "e2e_reconstruct", _Reconstruct(model), specs,
        [{"name": "text_ids", "shape": [batch_size, L], "dtype": "int64"},
         {"name": "image_ids", "shape": [batch_size, n], "dtype": "int64"}],
        [{"name": "images", "shape": [batch_size, 3, size, size], "dtype": "float32"}],
        "image token ids (gold or generated) -> the end-to-end reconstructor's image in [-1, 1]"))
    return graphs


class E2ETrainModule(VilgTrainModule):
    name = "vilg_e2e"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._image_tokenizer = load_tokenizer(cfg.Data.tokenizer_ckpt)
        self._rec_scale: Optional[float] = None  # the multiplier last written to the reconstructor

    def build_model(self) -> ErnieViLGE2E:
        paddle.seed(self.cfg.Global.seed)
        d = self.cfg.Distributed
        return ErnieViLGE2E(self.cfg.Model, self._image_tokenizer, self.cfg.E2E,
                            recompute=d.recompute, recompute_every_k=d.recompute_every_k)

    def train_batches(self, rank: int, world_size: int) -> E2EBatches:
        return E2EBatches(self.train_shards, self.text_tokenizer, self.cfg.Data.batch_size,
                          self.cfg.Data.max_text_len, self.cfg.Global.seed, rank, world_size,
                          image_size=self.cfg.Data.image_size)

    def training_step(self, ctx: StepContext, batch: dict[str, paddle.Tensor]) -> tuple[paddle.Tensor, dict[str, float]]:
        model: ErnieViLGE2E = ctx.model
        batch = self.with_null_conditions(ctx, batch)  # guidance training, as the two-stage generator
        text_ids, image_ids = batch["text_ids"], batch["image_ids"]
        # one teacher-forced pass gives both the generation logits and the hidden states; each
        # stream reads its (possibly nulled) condition, the targets stay the real image and text
        image_logits, h_img = model.txt2img_with_hidden(batch.get(T2I_TEXT_KEY, text_ids), image_ids)
        text_logits = ctx(text_ids, batch.get(I2T_IMAGE_KEY, image_ids), Direction.IMG2TXT)
        nll = self.criterion(image_logits, image_ids, text_logits, text_ids)
        w = self.cfg.E2E
        loss = w.gen_weight * nll.txt2img + w.i2t_weight * nll.img2txt
        logs = {"loss_txt2img": float(nll.txt2img), "loss_img2txt": float(nll.img2txt)}
        self._set_reconstructor_lr(model, reconstructor_lr_scale(w, ctx.step))
        if ctx.step >= w.rec_start_step:  # before it the reconstructor is idle (no loss, no decoder pass)
            rec = model.reconstruction_loss(model.e2e(h_img), batch["images"])
            loss = loss + w.rec_weight * rec
            logs["loss_rec"] = float(rec)
        return loss, logs

    def _set_reconstructor_lr(self, model: ErnieViLGE2E, scale: float) -> None:
        """Paddle's per-parameter lr multiplier (`optimize_attr`), read by the optimizer at every
        step; derived from the step, so a resumed run sets the same value."""
        if scale != self._rec_scale:
            for p in model.e2e.parameters():
                p.optimize_attr["learning_rate"] = scale
            self._rec_scale = scale

    def tokens(self, batch: dict[str, paddle.Tensor]) -> None:
        return None  # the reconstructor's work is not in `flops_per_token`

    def flops_per_token(self) -> None:
        return None

    def image_tokenizer(self) -> Any:
        return self._image_tokenizer
