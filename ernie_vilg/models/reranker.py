"""Contrastive image-text reranker (paper sec. 4.2: best-of-N candidates ranked by an image-text
matching model; sec. 3.2.1: pairs kept when their similarity exceeds 0.5).

A dual encoder in the style of CLIP:

    text  [B, L] ids --(embedding + pre-LN transformer, mean over non-pad tokens)--> [B, D]
    image [B, 3, S, S] --(patch stem, stride-2 conv stages, pool to g x g, flatten)--> [B, D]
    both L2-normalised; logits = cos / T with a learned temperature T

trained with the symmetric InfoNCE loss (image->text and text->image cross-entropy over the
batch, averaged).

The score in [0, 1]. Cosine similarity itself has no natural 0.5 point, and (cos + 1) / 2 puts
unrelated pairs near 0.5. So a two-parameter logistic calibration head, p = sigmoid(a * cos + b),
is fitted online on DETACHED cosines (it never moves the embeddings) with a class-balanced
binary cross-entropy: the mean over the B matching pairs plus the mean over the B(B-1)
mismatched pairs of each batch. Its output estimates P(match | cos) under equal priors, so
"score > 0.5" reads "more likely a matching pair than not", which is how the filter's threshold
is applied.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.data.filter import Scorer
from ernie_vilg.config import ConfigError, RerankerConfig

RERANKER_INFO_FILE = "reranker.json"
VOCAB_FILE = "vocab.txt"


class TextIds(Protocol):
    """What the reranker needs from a text tokenizer (ernie_vilg.text.TextTokenizer has it)."""

    pad_id: int
    vocab_size: int

    def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray: ...


class TextEncoder(nn.Layer):
    def __init__(self, vocab_size: int, max_len: int, cfg: RerankerConfig, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.tok = nn.Embedding(vocab_size, cfg.text_hidden)
        self.pos = nn.Embedding(max_len, cfg.text_hidden)
        layer = nn.TransformerEncoderLayer(
            cfg.text_hidden, cfg.text_heads, 4 * cfg.text_hidden, dropout=cfg.dropout,
            activation="gelu", normalize_before=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.text_layers)
        self.norm = nn.LayerNorm(cfg.text_hidden)
        self.proj = nn.Linear(cfg.text_hidden, cfg.embed_dim, bias_attr=False)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        keep = (ids != self.pad_id).astype("float32")  # [B, L]
        pos = paddle.arange(ids.shape[1], dtype="int64").unsqueeze(0)
        h = self.tok(ids) + self.pos(pos)  # [B, L, H]
        # additive mask broadcast over heads and queries: [B, 1, 1, L]
        attn_mask = ((1.0 - keep) * -1e4).unsqueeze([1, 2])
        h = self.norm(self.blocks(h, attn_mask))
        pooled = (h * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clip(min=1.0)  # [B, H]
        return self.proj(pooled)


class ImageEncoder(nn.Layer):
    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        if not cfg.image_channels:
            raise ConfigError("Reranker.image_channels: needs at least the stem's channel count")
        # stem: non-overlapping patches -> channels; then stride-2 3x3 conv stages
        first = cfg.image_channels[0]
        layers: list[nn.Layer] = [nn.Conv2D(3, first, cfg.patch_size, stride=cfg.patch_size),
                                  nn.GroupNorm(math.gcd(8, first), first), nn.GELU()]
        in_ch = first
        for ch in cfg.image_channels[1:]:
            layers += [nn.Conv2D(in_ch, ch, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, ch), ch), nn.GELU()]
            in_ch = ch
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2D(cfg.pool_grid)
        self.proj = nn.Linear(in_ch * cfg.pool_grid ** 2, cfg.embed_dim, bias_attr=False)

    def forward(self, images: paddle.Tensor) -> paddle.Tensor:
        h = self.pool(self.body(images))  # [B, C, g, g]
        return self.proj(h.flatten(1))  # [B, C*g*g] -> [B, D]


@dataclass
class RerankerOutput:
    loss: paddle.Tensor  # InfoNCE + calibration loss (the calibration sees detached cosines)
    contrastive_loss: paddle.Tensor
    calibration_loss: paddle.Tensor
    logits: paddle.Tensor  # [B, B] image-to-text logits, cos / T
    cos: paddle.Tensor  # [B, B] cosine similarity


class DualEncoder(nn.Layer):
    """The trainable reranker network."""

    def __init__(self, vocab_size: int, max_text_len: int, cfg: RerankerConfig, pad_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(vocab_size, max_text_len, cfg, pad_id)
        self.image = ImageEncoder(cfg)
        self.log_scale = self.create_parameter(
            [1], default_initializer=nn.initializer.Constant(math.log(1.0 / cfg.init_temperature)))
        # calibration head p = sigmoid(a * cos + b): a starts at 10, b at -5 (0.5 at cos = 0.5)
        self.calib_a = self.create_parameter([1], default_initializer=nn.initializer.Constant(10.0))
        self.calib_b = self.create_parameter([1], default_initializer=nn.initializer.Constant(-5.0))

    def embed_images(self, images: paddle.Tensor) -> paddle.Tensor:
        return F.normalize(self.image(images), axis=-1)

    def embed_texts(self, ids: paddle.Tensor) -> paddle.Tensor:
        return F.normalize(self.text(ids), axis=-1)

    def logit_scale(self) -> paddle.Tensor:
        return self.log_scale.exp().clip(max=self.cfg.max_logit_scale)

    def calibrated(self, cos: paddle.Tensor) -> paddle.Tensor:
        return F.sigmoid(self.calib_a * cos + self.calib_b)

    def forward(self, images: paddle.Tensor, text_ids: paddle.Tensor) -> RerankerOutput:
        img, txt = self.embed_images(images), self.embed_texts(text_ids)  # [B, D] each
        cos = img @ txt.T  # [B, B]; row i = image i against every text
        logits = cos * self.logit_scale()
        labels = paddle.arange(cos.shape[0], dtype="int64")
        contrastive = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        b = cos.shape[0]
        eye = paddle.eye(b, dtype="float32")
        bce = F.binary_cross_entropy_with_logits(
            self.calib_a * cos.detach() + self.calib_b, eye, reduction="none")
        pos = (bce * eye).sum() / b
        neg = (bce * (1 - eye)).sum() / max(b * (b - 1), 1)
        calibration = pos + neg if b > 1 else pos
        return RerankerOutput(contrastive + calibration, contrastive, calibration, logits, cos)


def build_dual_encoder(cfg: RerankerConfig, vocab_size: int, max_text_len: int, pad_id: int) -> DualEncoder:
    return DualEncoder(vocab_size, max_text_len, cfg, pad_id)


def text_ids(tokenizer: TextIds, texts: Sequence[str], max_len: int) -> paddle.Tensor:
    """int64 [B, L'] ids, padded only to the longest text of the batch (L' <= max_len): pad
    columns change nothing under the mask and mean pooling, and cost most of the text time."""
    ids = tokenizer.encode_batch(list(texts), max_len)
    used = np.nonzero((ids != tokenizer.pad_id).any(0))[0]
    width = int(used[-1]) + 1 if used.size else 1
    return paddle.to_tensor(ids[:, :width])


class Reranker:
    """A trained reranker for inference: `score(images, texts)` and `similarity(images, texts)`."""

    def __init__(self, model: DualEncoder, tokenizer: TextIds, image_size: int, max_text_len: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.model.eval()

    def _images(self, images: Any) -> paddle.Tensor:
        x = images if isinstance(images, paddle.Tensor) else paddle.to_tensor(np.asarray(images, dtype=np.float32))
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # generated images may come at another size than the reranker was trained on
            x = F.interpolate(x, size=[self.image_size, self.image_size], mode="bilinear", align_corners=False)
        return x.astype("float32")

    def _texts(self, texts: Sequence[str]) -> paddle.Tensor:
        return text_ids(self.tokenizer, texts, self.max_text_len)

    @paddle.no_grad()
    def similarity(self, images: Any, texts: Sequence[str]) -> np.ndarray:
        """Cosine matrix [N_images, N_texts] (images float [N, 3, S, S] in [-1, 1])."""
        img = self.model.embed_images(self._images(images))
        txt = self.model.embed_texts(self._texts(texts))
        return (img @ txt.T).numpy()

    @paddle.no_grad()
    def score(self, images: Any, texts: Sequence[str]) -> np.ndarray:
        """Calibrated match probability in [0, 1] of each pair (images[i], texts[i]): [N]."""
        x = self._images(images)
        if len(texts) != x.shape[0]:
            raise ValueError(f"score pairs images with texts one to one: {x.shape[0]} images, {len(texts)} texts")
        img = self.model.embed_images(x)
        txt = self.model.embed_texts(self._texts(texts))
        cos = (img * txt).sum(-1)
        return self.model.calibrated(cos).numpy().astype(np.float64)


def rank_candidates(reranker: Reranker, images: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Best-of-N: (order, scores) of N candidate images for one text. `order` lists candidate
    indices best first (ties keep the earlier candidate); `scores[i]` is candidate i's score."""
    images = reranker._images(images)
    scores = reranker.score(images, [text] * images.shape[0])
    order = np.argsort(-scores, kind="stable")
    return order, scores


def load_reranker(ckpt: str | Path) -> Reranker:
    """Rebuild a trained reranker from a checkpoint folder (or its run folder) alone."""
    from ernie_vilg.text.tokenizer import TextTokenizer
    from ernie_vilg.checkpoint_io import CheckpointError, load_checkpoint_config, load_weights_into

    ckpt_dir, cfg = load_checkpoint_config(ckpt)
    info_path = ckpt_dir / RERANKER_INFO_FILE
    if not info_path.is_file() or not (ckpt_dir / VOCAB_FILE).is_file():
        raise CheckpointError(f"{ckpt_dir}: not a reranker checkpoint (needs {RERANKER_INFO_FILE} and {VOCAB_FILE})")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    tokenizer = TextTokenizer(ckpt_dir / VOCAB_FILE)
    model = build_dual_encoder(cfg.Reranker, tokenizer.vocab_size, info["max_text_len"], tokenizer.pad_id)
    load_weights_into(model, ckpt_dir)
    return Reranker(model, tokenizer, info["image_size"], info["max_text_len"])


def reranker_scorer(ckpt: str | Path, batch_size: int = 64) -> Scorer:
    """The paper's filter rule 4 (`data.filter.Scorer`) backed by a trained reranker checkpoint
    (images loaded at its image size)."""
    from ernie_vilg.data.images import ImageError, load_image

    reranker = load_reranker(ckpt)
    size = reranker.image_size

    def score(paths: Sequence[str], texts: Sequence[str]) -> list[Any]:
        import numpy as np

        out: list[Any] = [None] * len(paths)
        images, ok = [], []
        for i, p in enumerate(paths):
            try:
                images.append(load_image(p, size))
                ok.append(i)
            except ImageError as exc:
                out[i] = ImageError(str(exc))
        for start in range(0, len(ok), batch_size):
            idx = ok[start: start + batch_size]
            s = reranker.score(np.stack(images[start: start + batch_size]), [texts[i] for i in idx])
            for i, v in zip(idx, s):
                out[i] = float(v)
        return out

    return score
