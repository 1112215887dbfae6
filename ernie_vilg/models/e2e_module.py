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

from typing import Any

import numpy as np
import paddle

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.data.images import load_image
from ernie_vilg.models.e2e import ErnieViLGE2E, load_image_tokenizer
from ernie_vilg.models.guidance import I2T_IMAGE_KEY, T2I_TEXT_KEY, ConditionDropper
from ernie_vilg.models.module import ShardBatches, VilgTrainModule
from ernie_vilg.models.sparse_masks import Direction


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


class E2ETrainModule(VilgTrainModule):
    name = "vilg_e2e"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if not cfg.Data.tokenizer_ckpt:
            raise ConfigError("Data.tokenizer_ckpt: the end-to-end stage needs the image tokenizer "
                              "(its decoder architecture and weights start the reconstructor)")
        self._image_tokenizer = load_image_tokenizer(cfg.Data.tokenizer_ckpt)
        self.image_size = int(self.train_shards.info.get("image_size", cfg.Data.image_size))

    def build_model(self) -> ErnieViLGE2E:
        paddle.seed(self.cfg.Global.seed)
        d = self.cfg.Distributed
        return ErnieViLGE2E(self.cfg.Model, self._image_tokenizer, self.cfg.E2E,
                            recompute=d.recompute, recompute_every_k=d.recompute_every_k)

    def train_batches(self, rank: int, world_size: int) -> E2EBatches:
        return E2EBatches(self.train_shards, self.text_tokenizer, self.cfg.Data.batch_size,
                          self.cfg.Data.max_text_len, self.cfg.Global.seed, rank, world_size,
                          image_size=self.image_size)

    def training_step(self, model: ErnieViLGE2E, batch: dict[str, paddle.Tensor], step: int
                      ) -> tuple[paddle.Tensor, dict[str, float]]:
        inner: ErnieViLGE2E = getattr(model, "_layers", model)
        if self.cfg.Train.cond_drop > 0:  # null conditions for classifier-free guidance, as VilgTrainModule
            if getattr(self, "_cond_dropper", None) is None:
                tok = self.text_tokenizer
                self._cond_dropper = ConditionDropper(self.cfg.Train.cond_drop, self.cfg.Global.seed, tok.cls_id,
                                                      tok.sep_id, tok.pad_id, paddle.distributed.get_rank())
            batch = self._cond_dropper(batch, step)
        text_ids, image_ids = batch["text_ids"], batch["image_ids"]
        # one teacher-forced pass gives both the generation logits and the hidden states; each
        # stream reads its (possibly nulled) condition, the targets stay the real image and text
        image_logits, h_img = inner.txt2img_with_hidden(batch.get(T2I_TEXT_KEY, text_ids), image_ids)
        text_logits = model(text_ids, batch.get(I2T_IMAGE_KEY, image_ids), Direction.IMG2TXT)
        nll = self.criterion(image_logits, image_ids, text_logits, text_ids)
        rec = inner.reconstruction_loss(inner.e2e(h_img), batch["images"])
        w = self.cfg.E2E
        loss = w.gen_weight * nll.txt2img + w.i2t_weight * nll.img2txt + w.rec_weight * rec
        return loss, {"loss_txt2img": float(nll.txt2img), "loss_img2txt": float(nll.img2txt),
                      "loss_rec": float(rec)}

    def image_tokenizer(self) -> Any:
        return self._image_tokenizer
