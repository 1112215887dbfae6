"""Stage `caption_finetune`: image captioning fine-tuned from a pre-trained vilg checkpoint (paper
sec. 4.3: AIC-ICC, COCO-CN; docs/finetune.md).

It is the vilg stage (`VilgTrainModule`: streamed token-shard batches, checkpoint extras) with:

- `Finetune.init_from`: the pre-trained checkpoint. Its weights are loaded (the optimizer starts
  fresh); the architecture (`Model`) is taken from it by `resolve`, and the text vocab must be its
  vocab (token ids must mean the same tokens), the image grid and codebook those of the shards.
  A missing or incompatible checkpoint is a `ConfigError` naming the path.
- `Finetune.directions`: `img2txt` minimises the caption NLL only; `both` keeps Eq. 3
  (text-to-image + image-to-text).
- validation = captions of the validation split decoded as `Generation` says (greedy, or beam
  search with `beam_size` / `length_penalty`), scored with the paper's caption metrics at
  character level (BLEU-4, ROUGE-L, CIDEr; METEOR with `Finetune.with_meteor`). The stage's
  `best_metric` (`Finetune.best_metric`, CIDEr) makes the Trainer keep the best weights in
  OUTPUT/best.

Scoring any vilg checkpoint the same way: `tools/score_captions.py` (`generation.captions`).
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Optional

import paddle

from ernie_vilg.checkpoint_io import CheckpointError, load_checkpoint_config
from ernie_vilg.config import Config, ConfigError
from ernie_vilg.generation.captions import caption_scores
from ernie_vilg.models.losses import caption_nll
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG
from ernie_vilg.stages.vilg import VOCAB_FILE, VilgTrainModule
from ernie_vilg.stages.vilg import resolve as resolve_vilg
from ernie_vilg.training.module import StepContext
from ernie_vilg.training.warm_start import load_weights

log = logging.getLogger(__name__)

DIRECTIONS = ("img2txt", "both")
SOURCE_STAGES = ("vilg", "vilg_e2e", "caption_finetune")  # checkpoints a caption model starts from


def resolve(cfg: Config) -> Config:
    """A copy of `cfg` whose `Model` is the pre-trained checkpoint's (dropout stays this config's)
    and whose vocab is the checkpoint's; the shards must speak its vocabularies."""
    from ernie_vilg.data.token_shards import read_shard_info

    f = cfg.Finetune
    if f.directions not in DIRECTIONS:
        raise ConfigError(f"Finetune.directions={f.directions!r}: known {', '.join(DIRECTIONS)}")
    if not f.init_from:
        raise ConfigError("Finetune.init_from is empty: caption fine-tuning starts from a pre-trained "
                          "vilg checkpoint (a step folder or a run folder)")
    where = f"Finetune.init_from={f.init_from}"
    try:
        ckpt_dir, src = load_checkpoint_config(f.init_from)
    except (CheckpointError, ConfigError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if src.Global.stage not in SOURCE_STAGES:
        raise ConfigError(f"{where}: a {src.Global.stage!r} checkpoint, not a vilg one")
    out = copy.deepcopy(cfg)
    vocab = ckpt_dir / VOCAB_FILE
    if not vocab.is_file():
        raise ConfigError(f"{where}: {ckpt_dir} has no {VOCAB_FILE} (not a vilg checkpoint?)")
    if not out.Data.vocab_file:
        out.Data.vocab_file = str(vocab)  # fine-tuning keeps the pre-trained vocab
    elif Path(out.Data.vocab_file).read_text(encoding="utf-8") != vocab.read_text(encoding="utf-8"):
        raise ConfigError(f"{where}: Data.vocab_file={out.Data.vocab_file} differs from the checkpoint's "
                          f"{vocab} (text ids would mean other tokens; leave Data.vocab_file empty to use it)")
    if not out.Data.train_shards:
        raise ConfigError("Data.train_shards is empty (write shards with tools/tokenize_images.py)")
    info = read_shard_info(out.Data.train_shards)
    for key, actual in (("image_grid", int(info["grid"])), ("image_vocab_size", int(info["codebook_size"]))):
        expected = getattr(src.Model, key)
        if expected not in (0, actual):
            raise ConfigError(f"{where}: the checkpoint has Model.{key}={expected} but Data.train_shards="
                              f"{out.Data.train_shards} has {actual} (tokenize with the pre-training image tokenizer)")
    # the weights fix the architecture; dropout is a training choice and stays this config's
    out.Model = copy.deepcopy(src.Model)
    out.Model.dropout = cfg.Model.dropout
    return resolve_vilg(out)


class CaptionFinetuneModule(VilgTrainModule):
    """TrainModule of `Global.stage: caption_finetune` (docs/finetune.md)."""

    name = "caption_finetune"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.best_metric = cfg.Finetune.best_metric  # the Trainer keeps OUTPUT/best by this metric

    def build_model(self) -> ErnieViLG:
        model = super().build_model()
        ckpt = load_weights(model, self.cfg.Finetune.init_from, "Finetune.init_from")
        log.info("caption fine-tuning from %s (weights only; fresh optimizer)", ckpt)
        return model

    def caption_loss(self, model: Any, batch: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """Mean NLL per caption target token (w_1 .. [SEP]), as the vilg criterion's img2txt term;
        `model` is the model or a StepContext."""
        text_ids = batch["text_ids"]
        logits = model(text_ids, batch["image_ids"], Direction.IMG2TXT)  # [B, L - 1, V_txt]
        return caption_nll(logits, text_ids, self.text_tokenizer.pad_id)

    def training_step(self, ctx: StepContext, batch: dict[str, paddle.Tensor]) -> tuple[paddle.Tensor, dict[str, float]]:
        if self.cfg.Finetune.directions == "both":
            return super().training_step(ctx, batch)
        loss = self.caption_loss(ctx, batch)
        return loss, {"loss_img2txt": float(loss)}

    def tokens(self, batch: dict[str, paddle.Tensor]) -> Optional[int]:
        # one stream per item when only captions are trained: not the unit of `flops_per_token`
        return super().tokens(batch) if self.cfg.Finetune.directions == "both" else None

    def validate(self, model: ErnieViLG, step: int) -> dict[str, float]:
        if self.val_shards is None:
            return {}
        f = self.cfg.Finetune
        count = len(self.val_shards) if f.eval_items <= 0 else min(f.eval_items, len(self.val_shards))
        # the loss over a few batches (cheap next to decoding), then every item captioned
        metrics = self.mean_val_losses(self.val_batches(), min(self.cfg.Train.eval_samples, count),
                                       lambda batch: {"val_loss_img2txt": float(self.caption_loss(model, batch))})
        # a bar on rank 0 only, as the Trainer's own (decoding every val item takes minutes)
        bar = self.cfg.Train.progress_bar and os.environ.get("PADDLE_TRAINER_ID", "0") == "0"
        scores, _ = caption_scores(model, self.text_tokenizer, [self.val_shards[i] for i in range(count)],
                                   self.cfg.Generation, f.with_meteor, self.cfg.Data.batch_size, bar)
        return {**metrics, **scores}
