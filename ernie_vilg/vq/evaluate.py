"""Reconstruction quality of an image tokenizer on manifest images.

The reconstruction goes through the real stage-1 path (`encode_to_ids` -> `decode_ids`), so the
numbers describe exactly what stage 2 will see and produce:

  * `psnr`: mean per-image PSNR in dB on the [0, 1] scale, and `rec_mse` on the [-1, 1] scale;
  * `perplexity` / `codes_used`: code histogram over all tokens of the evaluated images;
  * `judge_<attr>` (incl. `judge_all`): the shapes-world judge's accuracy on the reconstructions,
    against the ground truth in each manifest line's `attrs` field. Skipped when lines lack it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paddle

from ernie_vilg.data.images import denormalize, load_image
from ernie_vilg.data.manifest import ManifestRecord, read_manifest
from ernie_vilg.vq.base import ImageTokenizer


def _psnr(recon: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of [B, 3, H, W] arrays in [-1, 1], measured on the [0, 1] scale."""
    mse = (((recon - target) / 2.0) ** 2).reshape(recon.shape[0], -1).mean(axis=1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def evaluate_records(
    tokenizer: ImageTokenizer,
    records: list[ManifestRecord],
    image_size: int,
    batch_size: int = 32,
    with_judge: bool = True,
) -> dict[str, float]:
    """Reconstruct `records` through the tokenizer and return the metrics listed above."""
    if not records:
        raise ValueError("evaluate_records: no records to evaluate")
    counts = np.zeros(tokenizer.codebook_size, dtype=np.int64)
    psnrs, mses, judged = [], [], []
    # the judge only applies to shapes-world manifests; import it lazily so other data need not
    judge = with_judge and all("attrs" in rec.extra for rec in records)
    if judge:
        from ernie_vilg.data.shapes_judge import judge_accuracy, judge_image

    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        target = np.stack([load_image(rec.image_path, image_size) for rec in chunk])  # [b, 3, S, S]
        ids = tokenizer.encode_to_ids(paddle.to_tensor(target))  # [b, h, w]
        recon = tokenizer.decode_ids(ids).numpy()  # [b, 3, S, S] in [-1, 1]
        counts += np.bincount(ids.numpy().reshape(-1), minlength=tokenizer.codebook_size)
        psnrs.extend(_psnr(recon, target).tolist())
        mses.extend(((recon - target) ** 2).reshape(len(chunk), -1).mean(axis=1).tolist())
        if judge:
            for rec, img in zip(chunk, denormalize(recon)):  # uint8 [S, S, 3]
                judged.append(judge_image(img, rec.extra["attrs"]))

    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    metrics = {
        "psnr": float(np.mean(psnrs)),
        "rec_mse": float(np.mean(mses)),
        "perplexity": float(math.exp(-(nonzero * np.log(nonzero)).sum())),
        "codes_used": float((counts > 0).mean()),
        "num_images": float(len(records)),
    }
    if judge:
        metrics.update({f"judge_{k}": float(v) for k, v in judge_accuracy(judged).items() if k != "n"})
    return metrics


def evaluate_manifest(
    tokenizer: ImageTokenizer,
    manifest: str | Path,
    image_size: int,
    max_images: Optional[int] = None,
    batch_size: int = 32,
    with_judge: bool = True,
) -> dict[str, Any]:
    """`evaluate_records` on the first `max_images` lines of a manifest (all when None)."""
    records = read_manifest(manifest)
    if max_images is not None:
        records = records[:max_images]
    return evaluate_records(tokenizer, records, image_size, batch_size, with_judge)
