"""Classifier-free guidance, the training side: null conditions and seeded condition dropping.

Guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance"; used for autoregressive image
tokens by e.g. Make-A-Scene) needs one model that also knows the unconditional distribution.
Training teaches it by replacing the condition of a random fraction `Train.cond_drop` of the
samples with a null one, separately per direction:

    text-to-image  the text becomes the empty text `[CLS] [SEP] [PAD]..` (the text convention
                   of models/transformer.py, padded to the batch's width), the image targets stay;
    image-to-text  every image token becomes NULL_IMAGE_ID, embedded by the model's learned
                   `null_img_emb` (+ the row / column position embeddings); the text targets stay.

The decision for sample i is a function of (seed, step, rank, micro batch, direction, i), never
of a global RNG stream, so a resumed run drops exactly the samples the uninterrupted run would
have dropped. Sampling with guidance lives in generation/decoding.py (`GuidedStepper`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import paddle

# The reserved image id of the null image. Negative, so it can never be a codebook entry and the
# tied image head (one row per codebook entry) can never predict it.
NULL_IMAGE_ID = -1

# Batch keys read by VilgTrainModule.losses: the text-to-image stream's text and the
# image-to-text stream's image; when absent, each stream uses batch["text_ids"] / batch["image_ids"].
T2I_TEXT_KEY = "t2i_text_ids"
I2T_IMAGE_KEY = "i2t_image_ids"

# the two directions draw independent decisions (the index of their RNG key)
_T2I_STREAM, _I2T_STREAM = 0, 1


def null_text_ids(batch_size: int, width: int, cls_id: int, sep_id: int, pad_id: int) -> np.ndarray:
    """The empty text `[CLS] [SEP]` padded to `width` (>= 2) for `batch_size` rows: int64 [B, width]."""
    if width < 2:
        raise ValueError(f"a null text needs at least 2 positions ([CLS] [SEP]), got {width}")
    out = np.full((batch_size, width), pad_id, dtype=np.int64)
    out[:, 0], out[:, 1] = cls_id, sep_id
    return out


def null_image_ids(batch_size: int, num_image: int) -> np.ndarray:
    """The null image: every one of `num_image` tokens is NULL_IMAGE_ID, int64 [B, n]."""
    return np.full((batch_size, num_image), NULL_IMAGE_ID, dtype=np.int64)


def drop_mask(prob: float, batch_size: int, seed: int, step: int, stream: int, rank: int = 0,
              micro: int = 0) -> np.ndarray:
    """bool [B]: which samples lose their condition. A pure function of its arguments."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"Train.cond_drop={prob} is not a probability in [0, 1]")
    if prob == 0.0:
        return np.zeros(batch_size, dtype=bool)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), int(rank), int(micro), int(stream)])
    return rng.random(batch_size) < prob


def drop_conditions(batch: dict[str, Any], prob: float, seed: int, step: int, cls_id: int, sep_id: int,
                    pad_id: int, rank: int = 0, micro: int = 0) -> dict[str, Any]:
    """The batch with each direction's condition nulled for a seeded `prob` fraction of samples.

    Returns `batch` itself when prob == 0; else a shallow copy with two more keys:
    T2I_TEXT_KEY (text_ids with the dropped rows replaced by the null text) and I2T_IMAGE_KEY
    (image_ids, same shape, with the dropped rows all NULL_IMAGE_ID). The two masks are drawn
    independently, so a sample may lose its text in one stream and keep its image in the other.
    """
    if prob == 0.0:
        drop_mask(prob, 0, seed, step, _T2I_STREAM)  # still validates prob
        return batch
    text_ids, image_ids = batch["text_ids"], batch["image_ids"]
    B, width = text_ids.shape[0], text_ids.shape[1]
    out = dict(batch)
    t2i = drop_mask(prob, B, seed, step, _T2I_STREAM, rank, micro)
    i2t = drop_mask(prob, B, seed, step, _I2T_STREAM, rank, micro)
    # paddle.where on the batch's own tensors keeps them on their device (no host round trip)
    null_txt = paddle.to_tensor(null_text_ids(1, width, cls_id, sep_id, pad_id)).astype(text_ids.dtype)
    mask = paddle.to_tensor(t2i).reshape([B, 1])
    out[T2I_TEXT_KEY] = paddle.where(mask, null_txt.expand_as(text_ids), text_ids)
    img_mask = paddle.to_tensor(i2t).reshape([B] + [1] * (image_ids.ndim - 1))
    null_img = paddle.full_like(image_ids, NULL_IMAGE_ID)
    out[I2T_IMAGE_KEY] = paddle.where(img_mask.expand_as(image_ids), null_img, image_ids)
    return out


class ConditionDropper:
    """`drop_conditions` for a training stage: fixed prob / seed / text specials / rank, and a
    count of the micro batches of the current step, so that with gradient accumulation each
    micro batch of a step draws its own decisions (a resumed step starts again at micro batch 0,
    as the uninterrupted run did)."""

    def __init__(self, prob: float, seed: int, cls_id: int, sep_id: int, pad_id: int, rank: int = 0) -> None:
        drop_mask(prob, 0, seed, 0, _T2I_STREAM)  # a bad probability fails at construction
        self.prob, self.seed, self.rank = float(prob), int(seed), int(rank)
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self._step, self._micro = -1, 0

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        if step != self._step:
            self._step, self._micro = step, 0
        out = drop_conditions(batch, self.prob, self.seed, step, self.cls_id, self.sep_id, self.pad_id,
                              self.rank, self._micro)
        self._micro += 1
        return out
