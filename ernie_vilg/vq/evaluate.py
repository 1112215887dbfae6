"""Reconstruction quality of an image tokenizer on manifest images.

The reconstruction goes through the real stage-1 path (`encode_to_ids` -> `decode_ids`), so the
numbers describe exactly what stage 2 will see and produce:

  * `psnr`: mean per-image PSNR in dB on the [0, 1] scale, and `rec_mse` on the [-1, 1] scale;
  * `perplexity` / `codes_used`: code histogram over all tokens of the evaluated images;
  * `judge_<attr>` (incl. `judge_all`): the shapes-world judge's accuracy on the reconstructions,
    against the ground truth in each manifest line's `attrs` field. Skipped when lines lack it.

`judge_gold_reconstructions` is the tokenizer's ceiling for text-to-image: it decodes given gold
token grids (e.g. the token shards stage 2 trains on) and judges them, so no generator that emits
these tokens can score higher (`benchmarks/tokenizer_ceiling.py`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

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


GOLD_PREFIX = "judge_gold_"


def judge_gold_reconstructions(
    tokenizer: ImageTokenizer,
    image_ids: Union[np.ndarray, Sequence[np.ndarray]],
    claims: Sequence[Union[str, dict[str, Any]]],
    batch_size: int = 32,
    return_results: bool = False,
) -> Union[dict[str, float], tuple[dict[str, float], list[Any]]]:
    """Decode gold token grids and judge each image against its claim.

    `image_ids`: [N, h, w] integer ids (an array or N arrays of [h, w]); `claims`: N ground-truth
    `attrs` dicts (as in a shapes manifest line) or N captions (parsed by `parse_caption`).
    Returns the judge's image-level accuracies with keys `judge_gold_shape`, `_colour`,
    `_position`, `_size`, `_count`, `_all`, the object-level `judge_gold_object_*` and
    `judge_gold_n`; with `return_results` also the per-image `JudgeResult`s (for breakdowns).
    """
    from ernie_vilg.data.shapes_judge import judge_accuracy, judge_image

    ids = np.stack([np.asarray(row) for row in image_ids]) if not isinstance(image_ids, np.ndarray) else image_ids
    if ids.ndim != 3:
        raise ValueError(f"judge_gold_reconstructions: image_ids must be [N, h, w], got shape {ids.shape}")
    if len(ids) != len(claims):
        raise ValueError(f"judge_gold_reconstructions: {len(ids)} token grids but {len(claims)} claims")
    if len(ids) == 0:
        raise ValueError("judge_gold_reconstructions: nothing to judge")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"judge_gold_reconstructions: image_ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= tokenizer.codebook_size:
        # an id outside the codebook means the tokens come from another tokenizer
        raise ValueError(f"judge_gold_reconstructions: ids span [{ids.min()}, {ids.max()}] but the "
                         f"tokenizer's codebook has {tokenizer.codebook_size} entries")
    results = []
    with paddle.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = paddle.to_tensor(ids[start : start + batch_size].astype(np.int64))
            images = denormalize(tokenizer.decode_ids(chunk).numpy())  # uint8 [b, S, S, 3]
            for img, claim in zip(images, claims[start : start + batch_size]):
                results.append(judge_image(img, claim))
    acc = {f"{GOLD_PREFIX}{k}": float(v) for k, v in judge_accuracy(results).items()}
    return (acc, results) if return_results else acc


def gold_ids_of_records(
    tokenizer: ImageTokenizer, records: Sequence[ManifestRecord], image_size: int, batch_size: int = 32
) -> np.ndarray:
    """The gold token grids [N, h, w] of manifest images: what `tokenize_manifest` writes."""
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = np.stack([load_image(rec.image_path, image_size) for rec in chunk])
        out.append(tokenizer.encode_to_ids(paddle.to_tensor(images)).numpy())
    return np.concatenate(out)


def reconstruction_media(tokenizer: ImageTokenizer, records: list[ManifestRecord], image_size: int,
                         items: int = 8) -> Any:
    """data.media.ValidationMedia of a tokenizer stage: the first `items` val images (top
    row) over their reconstructions through the codebook (bottom row)."""
    from ernie_vilg.data.media import ValidationMedia, media_grid

    chunk = records[:items]
    if not chunk:
        return ValidationMedia()
    target = np.stack([load_image(rec.image_path, image_size) for rec in chunk])  # [b, 3, S, S]
    recon = tokenizer.decode_ids(tokenizer.encode_to_ids(paddle.to_tensor(target))).numpy()
    return ValidationMedia(images={"reconstructions": media_grid([denormalize(target), denormalize(recon)])})
