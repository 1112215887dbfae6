"""Best-of-N text-to-image (paper sec. 4.2): sample N images per text, rank them, keep the best K.

Two ranking signals, usable alone or together:

- `reranker`: the contrastive image-text matching model (models/reranker.py), its calibrated
  match probability of (image, text), as the paper re-ranks with;
- `likelihood`: the generator's own image-to-text direction, the mean log-probability per token
  of the prompt given the candidate's image tokens (one teacher-forced forward pass; no extra
  model needed, the bidirectional model scores its own samples);
- `both`: candidates ordered by the sum of their ranks under the two signals (rank sums need no
  common scale between a probability and a log-likelihood); ties keep the earlier candidate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import paddle

from ernie_vilg.models.losses import caption_nll
from ernie_vilg.models.sparse_masks import Direction

RANK_SIGNALS = ("reranker", "likelihood", "both")


@dataclass
class Ranking:
    """The N candidates of one text: `order` = candidate indices best first; `scores` per signal
    (index = candidate); `kept` = the first K of `order`."""

    text: str
    order: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    keep: int = 1

    @property
    def kept(self) -> np.ndarray:
        return self.order[:self.keep]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "order": [int(i) for i in self.order], "kept": [int(i) for i in self.kept],
                "scores": {k: [round(float(v), 6) for v in s] for k, s in self.scores.items()}}


@paddle.no_grad()
def caption_log_likelihood(model: Any, image_ids: np.ndarray, text_ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Mean log p(text | image) per target token ([SEP] included, padding not) for each row.

    image_ids [N, h, w]; text_ids [N, L] ([CLS] ... [SEP] then padding) or [L] for one text
    shared by all N images. Returns float64 [N]."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    text_ids = np.asarray(text_ids, dtype=np.int64)
    if text_ids.ndim == 1:
        text_ids = np.repeat(text_ids[None], len(image_ids), axis=0)
    if len(text_ids) != len(image_ids):
        raise ValueError(f"{len(image_ids)} image grids but {len(text_ids)} texts")
    text = paddle.to_tensor(text_ids)
    logits = model(text, paddle.to_tensor(image_ids), Direction.IMG2TXT)  # [N, L-1, V]
    return -caption_nll(logits, text, pad_id, per_row=True).numpy().astype(np.float64)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """0 for the best (highest) score; ties keep the earlier candidate first."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(len(scores))
    return ranks


def rank_candidates_by(scores: dict[str, np.ndarray], signal: str) -> np.ndarray:
    """Candidate order (best first) under `signal` from per-signal scores (higher = better)."""
    if signal not in RANK_SIGNALS:
        raise ValueError(f"unknown ranking signal {signal!r} (known: {', '.join(RANK_SIGNALS)})")
    if signal == "both":
        total = _ranks(scores["reranker"]) + _ranks(scores["likelihood"])
        return np.argsort(total, kind="stable")
    return np.argsort(-scores[signal], kind="stable")


def score_candidates(bundle: Any, text: str, images: np.ndarray, image_ids: np.ndarray, signal: str,
                     reranker: Optional[Any] = None) -> dict[str, np.ndarray]:
    """Per-signal scores of N candidates of one text. images uint8 [N, H, W, 3]; image_ids [N, h, w]."""
    scores: dict[str, np.ndarray] = {}
    if signal in ("reranker", "both"):
        if reranker is None:
            raise ValueError(f"ranking by {signal!r} needs a reranker checkpoint (--reranker DIR)")
        from ernie_vilg.models.reranker import rank_candidates

        pixels = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0  # [N, 3, H, W] in [-1, 1]
        _, scores["reranker"] = rank_candidates(reranker, pixels, text)
    if signal in ("likelihood", "both"):
        cfg = bundle.cfg
        ids = bundle.text_tokenizer.encode_batch([text], cfg.Data.max_text_len, pad_to_longest=True)[0]
        scores["likelihood"] = caption_log_likelihood(bundle.model, image_ids, ids, bundle.text_tokenizer.pad_id)
    return scores


def best_of_n(bundle: Any, texts: Sequence[str], num_candidates: int, keep: int, signal: str = "reranker",
              reranker: Optional[Any] = None, seed: int = 0, cfg_scale: Optional[float] = None
              ) -> tuple[np.ndarray, list[Ranking]]:
    """Sample `num_candidates` images per text and rank them. Returns all images
    uint8 [len(texts) * N, H, W, 3] (candidates of text i adjacent, in sampling order) and one
    Ranking per text. `cfg_scale`: guidance of the sampling (default Generation.cfg_scale). The
    likelihood signal stays unguided: a guided score in the PMI form
    log p(t | i) + (s - 1) (log p(t | i) - log p(t | null)) ranks the candidates of one text exactly
    as log p(t | i) does, since log p(t | null) is the same for all of them."""
    from ernie_vilg.generation.pipelines import decode_generated, text_to_image_ids

    if not 1 <= keep <= num_candidates:
        raise ValueError(f"--keep must be in [1, --num-candidates={num_candidates}], got {keep}")
    if bundle.decoder == "tokenizer" and bundle.image_tokenizer is None:
        raise FileNotFoundError(f"{bundle.ckpt_dir}: no image tokenizer to decode image tokens")
    if signal in ("reranker", "both") and reranker is None:
        raise ValueError(f"ranking by {signal!r} needs a reranker checkpoint (--reranker DIR)")
    all_images, rankings = [], []
    for i, text in enumerate(texts):
        ids = text_to_image_ids(bundle, [text], num_candidates, seed=seed + i, cfg_scale=cfg_scale)
        images = decode_generated(bundle, [text], ids, num_candidates)
        scores = score_candidates(bundle, text, images, ids, signal, reranker)
        rankings.append(Ranking(text, rank_candidates_by(scores, signal), scores, keep))
        all_images.append(images)
    return np.concatenate(all_images), rankings


def ranked_grid(images: np.ndarray, rankings: Sequence[Ranking], border: int = 2) -> np.ndarray:
    """One row per text, its candidates best first; kept ones framed green, the rest grey."""
    n = len(images) // max(len(rankings), 1)
    h, w = images.shape[1:3]
    cell_h, cell_w = h + 2 * border, w + 2 * border
    grid = np.zeros((len(rankings) * cell_h, n * cell_w, 3), dtype=np.uint8)
    for r, ranking in enumerate(rankings):
        for c, cand in enumerate(ranking.order):
            y, x = r * cell_h, c * cell_w
            grid[y:y + cell_h, x:x + cell_w] = (40, 200, 60) if c < ranking.keep else (90, 90, 90)
            grid[y + border:y + border + h, x + border:x + border + w] = images[r * n + int(cand)]
    return grid
