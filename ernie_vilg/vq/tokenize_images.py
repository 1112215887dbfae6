"""Turn a manifest's images into token shards with a trained image tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ernie_vilg.data.images import ImageError, load_image
from ernie_vilg.data.manifest import ManifestError, ManifestStats, iter_manifest
from ernie_vilg.data.token_shards import TokenShardWriter

log = logging.getLogger(__name__)


def tokenize_manifest(
    ckpt: str | Path, manifest: str | Path, out: str | Path, batch_size: int = 64,
    shard_size: int = 10000, image_size: int = 0,
) -> dict[str, Any]:
    """Encode every image of `manifest` to ids and write token shards to `out`.

    Bad images and bad manifest lines are skipped and counted (returned in the summary).
    """
    import paddle

    from ernie_vilg.checkpoint_io import load_checkpoint_config
    from ernie_vilg.vq.registry import load_tokenizer

    ckpt_dir, cfg = load_checkpoint_config(ckpt)
    tokenizer = load_tokenizer(ckpt_dir)
    size = image_size or cfg.Data.image_size
    grid = tokenizer.grid_size(size)
    manifest = Path(manifest)
    writer = TokenShardWriter(
        out, grid, tokenizer.codebook_size, shard_size,
        info={"tokenizer_ckpt": str(ckpt_dir.resolve()), "image_size": size,
              "manifest": str(manifest.resolve())},
    )
    stats = ManifestStats()
    bad_images = 0
    pending: list[tuple[np.ndarray, Any]] = []

    def flush() -> None:
        if not pending:
            return
        images = paddle.to_tensor(np.stack([p[0] for p in pending]))
        with paddle.no_grad():
            ids = tokenizer.encode_to_ids(images).numpy()
        for (_, rec), row in zip(pending, ids):
            meta = {k: v for k, v in rec.extra.items() if k != "_image_raw"}
            meta["image"] = rec.image_path
            writer.add(row, rec.text, rec.texts, meta)
        pending.clear()

    # disable=None: a bar only on a terminal; redirected, its carriage returns would be noise in
    # the log and around a one-line error on stderr
    for rec in tqdm(iter_manifest(manifest, stats=stats), desc=f"tokenize {manifest.name}", unit="img", disable=None):
        try:
            pending.append((load_image(rec.image_path, size), rec))
        except ImageError as exc:
            bad_images += 1
            log.warning("skipping: %s", exc)
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    if writer.rows == 0:
        # an empty or all-bad manifest: 0 rows is never what the user meant, and info.json would
        # make the folder look like valid (empty) training data
        raise ManifestError(str(manifest), f"no usable image-text pair to tokenize "
                                           f"({stats.skipped} bad lines, {bad_images} bad images)")
    info = writer.close()
    return {"out": str(out), "count": info["count"], "grid": grid,
            "codebook_size": tokenizer.codebook_size, "skipped_images": bad_images,
            "skipped_lines": stats.skipped}
