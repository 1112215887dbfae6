"""The ERNIE-ViLG training criterion (paper Eq. 3-5): L = L_txt2img + L_img2txt.

Each direction is a token-mean negative log-likelihood over its target tokens: every image token
for text-to-image, the non-padding text targets (w_1 .. [SEP]) for image-to-text. Token means
(rather than the sums of Eq. 4-5) keep the two terms on one scale whatever n and m are; the
per-direction values are returned for logging.

`VilgCriterion(txt2img_weight=, img2txt_weight=)` (`Train.txt2img_weight` / `img2txt_weight`) weights
the two terms; both default to 1, the paper's objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

Tensor = paddle.Tensor


@dataclass
class VilgLoss:
    total: Tensor  # scalar to minimise
    txt2img: Tensor  # scalar, mean NLL per image token
    img2txt: Tensor  # scalar, mean NLL per text target token


def token_nll(logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean NLL over the tokens where loss_mask is 1. logits [B, T, V], targets [B, T] int64."""
    nll = F.cross_entropy(logits.astype("float32"), targets.unsqueeze(-1), reduction="none").squeeze(-1)  # [B, T]
    return masked_mean(nll, loss_mask)


def masked_mean(nll: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean of per-token NLLs [B, T] over the tokens where loss_mask is 1 (all when None)."""
    if loss_mask is None:
        return nll.mean()
    mask = loss_mask.astype("float32")
    return (nll * mask).sum() / paddle.clip(mask.sum(), min=1.0)


def caption_nll(text_logits: Tensor, text_ids: Tensor, pad_id: int, per_row: bool = False) -> Tensor:
    """NLL of a text under image-to-text logits: the one caption likelihood of the project (the
    criterion's img2txt term, caption fine-tuning, best-of-N's likelihood signal).

    text_logits [B, L - 1, V] (row j predicts text_ids[:, j + 1]), text_ids [B, L] padded with
    `pad_id`; the targets are w_1 .. [SEP], padding excluded. Mean per target token over the batch,
    or per row ([B], `per_row`)."""
    targets = text_ids[:, 1:]  # [B, L - 1]: w_1 .. [SEP] then padding
    mask = targets != pad_id
    if not per_row:
        return token_nll(text_logits, targets, mask)
    nll = F.cross_entropy(text_logits.astype("float32"), targets.unsqueeze(-1), reduction="none").squeeze(-1)
    m = mask.astype("float32")
    return (nll * m).sum(1) / paddle.clip(m.sum(1), min=1.0)


def answer_loss_mask(text_ids: Tensor, text_prefix: Tensor, pad_id: int) -> Tensor:
    """bool [B, L - 1] of a VQA stream `[CLS] question [SEP] answer [SEP] [PAD]..`: row j
    (predicting text j + 1) counts iff j + 1 is an answer position (>= the prefix length P) and not
    padding."""
    target_pos = paddle.arange(1, text_ids.shape[1]).unsqueeze(0)  # [1, L - 1]
    in_answer = target_pos >= text_prefix.reshape([-1, 1]).astype(target_pos.dtype)  # [B, L - 1]
    return paddle.logical_and(in_answer, text_ids[:, 1:] != pad_id)


def answer_nll(text_logits: Tensor, text_ids: Tensor, text_prefix: Tensor, pad_id: int) -> Tensor:
    """Mean NLL per answer token (answer + its [SEP]) of VQA streams; question and padding excluded."""
    return token_nll(text_logits, text_ids[:, 1:], answer_loss_mask(text_ids, text_prefix, pad_id))


class VilgCriterion(nn.Layer):
    """(image logits, image ids, text logits, text ids) -> VilgLoss."""

    def __init__(self, pad_id: int, txt2img_weight: float = 1.0, img2txt_weight: float = 1.0,
                 chunk_tokens: int = 0) -> None:
        super().__init__()
        if txt2img_weight < 0 or img2txt_weight < 0 or txt2img_weight + img2txt_weight <= 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got txt2img {txt2img_weight}, "
                             f"img2txt {img2txt_weight}")
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0 (0 = plain logits), got {chunk_tokens}")
        self.pad_id = pad_id
        # > 0: `bidirectional_loss` asks the model for per-token NLLs from the chunked head
        # (models/chunked_ce.py, Train.loss_chunk_tokens) instead of whole logits
        self.chunk_tokens = int(chunk_tokens)
        self.txt2img_weight, self.img2txt_weight = float(txt2img_weight), float(img2txt_weight)

    def forward(self, image_logits: Tensor, image_ids: Tensor, text_logits: Tensor, text_ids: Tensor) -> VilgLoss:
        """image_logits [B, n, V_img], image_ids [B, h, w] or [B, n]; text_logits [B, L-1, V_txt]
        (row j predicts text_ids[:, j + 1]), text_ids [B, L] padded with `pad_id`."""
        image_targets = image_ids.reshape([image_ids.shape[0], -1])  # [B, h, w] -> [B, n]
        loss_t2i = token_nll(image_logits, image_targets)
        loss_i2t = caption_nll(text_logits, text_ids, self.pad_id)
        # weights of 1.0 multiply exactly: the default is the paper's sum bit for bit
        return VilgLoss(self.txt2img_weight * loss_t2i + self.img2txt_weight * loss_i2t, loss_t2i, loss_i2t)

    def from_nll(self, image_nll: Tensor, text_nll: Tensor, text_ids: Tensor) -> VilgLoss:
        """The same loss from per-token NLLs (image [B, n], text [B, L-1]) of the chunked head."""
        loss_t2i = masked_mean(image_nll)
        text_targets = text_ids[:, 1:]
        loss_i2t = masked_mean(text_nll, text_targets != self.pad_id)
        return VilgLoss(self.txt2img_weight * loss_t2i + self.img2txt_weight * loss_i2t, loss_t2i, loss_i2t)


def bidirectional_loss(model: nn.Layer, criterion: VilgCriterion, text_ids: Tensor, image_ids: Tensor,
                       t2i_text_ids: Tensor | None = None, i2t_image_ids: Tensor | None = None) -> VilgLoss:
    """L = L_txt2img + L_img2txt of one batch, both directions in one pass (`ErnieViLG.forward_both`;
    `model` is the model or a distributed wrapper of it).

    The text-to-image stream reads `t2i_text_ids` and the image-to-text stream `i2t_image_ids`
    when given (null conditions of guidance training); the targets are always the real image and
    text."""
    # through __call__ (direction "both" = ErnieViLG.BOTH), so DataParallel / sharding wrappers hook in
    if getattr(criterion, "chunk_tokens", 0) > 0:
        # the heads inside the model's forward (stage-3 gathering hooks see them) return NLLs
        image_targets = image_ids.reshape([image_ids.shape[0], -1])
        image_nll, text_nll = model(text_ids, image_ids, "both", None, t2i_text_ids, i2t_image_ids,
                                    head_targets=(image_targets, text_ids[:, 1:]),
                                    chunk_tokens=criterion.chunk_tokens)
        return criterion.from_nll(image_nll, text_nll, text_ids)
    image_logits, text_logits = model(text_ids, image_ids, "both", None, t2i_text_ids, i2t_image_ids)
    return criterion(image_logits, image_ids, text_logits, text_ids)
