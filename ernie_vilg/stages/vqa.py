"""The "vqa" training stage: generative VQA (paper sec. 4.4) as image-to-text with a question prefix.

Stream and masks (`sparse_masks.py`): `[z_1..z_n, [CLS] question [SEP] answer [SEP] [PAD]..]`.
The image and `[CLS] question [SEP]` (P text positions, per sample) are the source: the question
is bidirectional and sees the whole image, image tokens keep their sparse pattern (and, with
`Model.image_sees_prefix`, also see the question). The answer is
the causal target and the loss covers only its tokens (answer + its [SEP]), never the question or
the padding (`answer_loss_mask`).

Data: VQA token shards, i.e. `tools/tokenize_images.py` run on a VQA manifest (one line per
question: `image`, `text` = the answer, `question`, optional `qtype` / `id`; FM-IQA via
`tools/convert_dataset.py --format fmiqa`, the shapes world via `tools/make_shapes_vqa.py`). Each
shard row is one question: its image's token ids, and the question / answer in the row's meta. An
image asked three questions is encoded three times; the ids are small next to the model.

The module reuses the vilg stage: `ShardBatches` (seeded, resumable epoch order, here
`data.vqa_batches.VqaBatches`), the model size resolution and the checkpoint extras (vocab + image
tokenizer copy), so `--ckpt DIR` of a VQA run loads with the same
`pipeline.load_bundle`. `VQA.init_from` starts from a pre-trained vilg checkpoint
(`training.warm_start.init_by_token`). Answering and scoring: `generation/vqa.py`.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import paddle

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.data.vqa_batches import VqaBatches, record_question
from ernie_vilg.generation.vqa import evaluate_shards
from ernie_vilg.models.losses import answer_nll
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG
from ernie_vilg.stages.vilg import VilgTrainModule, fill_model_sizes, vocab_size
from ernie_vilg.training.module import StepContext
from ernie_vilg.training.warm_start import init_by_token

log = logging.getLogger(__name__)


def vqa_loss(model: Any, batch: dict[str, paddle.Tensor], pad_id: int) -> paddle.Tensor:
    """Mean NLL per answer token (answer + its [SEP]); `model` is the model or a StepContext."""
    text_ids, prefix = batch["text_ids"], batch["text_prefix"]
    logits = model(text_ids, batch["image_ids"], Direction.IMG2TXT, prefix)  # [B, L - 1, V_txt]
    return answer_nll(logits, text_ids, prefix, pad_id)


def resolve(cfg: Config) -> Config:
    """A copy of `cfg`: question / answer lengths checked, model sizes of the VQA shards filled in."""
    from ernie_vilg.data.token_shards import TokenShards

    if not cfg.Data.vocab_file:
        raise ConfigError("Data.vocab_file is empty (build one over questions and answers: "
                          "tools/vqa.py --build-vocab OUT --manifest M ...)")
    if not cfg.Data.train_shards:
        raise ConfigError("Data.train_shards is empty (tokenize a VQA manifest with tools/tokenize_images.py)")
    q, a = cfg.VQA.max_question_len, cfg.VQA.max_answer_len
    if q < 3 or a < 2:
        raise ConfigError(f"VQA.max_question_len={q} / max_answer_len={a}: need >= 3 / >= 2 "
                          "([CLS] q [SEP] and a [SEP])")
    if q + a > cfg.Model.max_text_len:
        raise ConfigError(f"VQA.max_question_len + max_answer_len = {q + a} exceeds "
                          f"Model.max_text_len={cfg.Model.max_text_len}")
    shards = TokenShards(cfg.Data.train_shards)
    record_question(shards[0])  # fail early on caption shards
    out = copy.deepcopy(cfg)
    if not out.Data.tokenizer_ckpt:
        out.Data.tokenizer_ckpt = str(shards.info.get("tokenizer_ckpt", ""))
    if shards.info.get("image_size"):
        out.Data.image_size = int(shards.info["image_size"])
    fill_model_sizes(out, vocab_size(out.Data.vocab_file), shards.grid, shards.codebook_size)
    return out


class VqaTrainModule(VilgTrainModule):
    """TrainModule of `Global.stage: vqa` (checkpoint extras and image tokenizer as the vilg stage)."""

    name = "vqa"

    def __init__(self, cfg: Config) -> None:
        from ernie_vilg.data.token_shards import TokenShards

        super().__init__(cfg)
        self.train_shards = TokenShards(cfg.Data.train_shards)  # VQA rows are held in memory

    def build_model(self) -> ErnieViLG:
        model = super().build_model()
        if self.cfg.VQA.init_from:
            vocab = Path(self.cfg.Data.vocab_file).read_text(encoding="utf-8").splitlines()
            counts = init_by_token(model, self.cfg.VQA.init_from, vocab)
            log.info("VQA: initialised from %s (%s)", self.cfg.VQA.init_from, counts)
        return model

    def _batches(self, shards: Any, rank: int = 0, world_size: int = 1) -> VqaBatches:
        return VqaBatches(shards, self.text_tokenizer, self.cfg.Data.batch_size, self.cfg.VQA.max_question_len,
                          self.cfg.VQA.max_answer_len, self.cfg.Global.seed, rank, world_size)

    def train_batches(self, rank: int, world_size: int) -> VqaBatches:
        return self._batches(self.train_shards, rank, world_size)

    def val_batches(self) -> VqaBatches:
        return self._batches(self.val_shards)

    def training_step(self, ctx: StepContext, batch: dict[str, paddle.Tensor]) -> tuple[paddle.Tensor, dict[str, float]]:
        loss = vqa_loss(ctx, batch, self.text_tokenizer.pad_id)
        return loss, {"loss_answer": float(loss)}

    def tokens(self, batch: dict[str, paddle.Tensor]) -> None:
        return None  # one stream per item, not the two of `flops_per_token`

    def flops_per_token(self) -> None:
        return None

    def validate(self, model: ErnieViLG, step: int) -> dict[str, float]:
        if self.val_shards is None:
            return {}
        count = min(self.cfg.Train.eval_samples, len(self.val_shards))
        pad = self.text_tokenizer.pad_id
        metrics = self.mean_val_losses(self.val_batches(), count,
                                       lambda batch: {"val_loss_answer": float(vqa_loss(model, batch, pad))})
        scores, _ = evaluate_shards(model, self.text_tokenizer, self.val_shards, self.cfg, count)
        metrics.update({f"vqa_{k}": float(v) for k, v in scores.items() if not k.startswith("n_")})
        return metrics
