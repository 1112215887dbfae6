"""Image completion measured on the shapes world: keep the top rows of one image's tokens, generate
the rest for ANOTHER image's caption, and ask the shapes judge whether the result shows the new
caption (and, for contrast, whether it still shows the old one).

    python tools/complete.py --ckpt RUN/vilg --shards RUN/tokens/test \
        [--keep-rows 0 1 2 3] [--items 64] [--seed 0] [--pairing other|self] [--out completion.json]

Pairing `other` (editing): item i keeps rows of its own true tokens and takes the caption of item
(i + n/2) mod n, so every new caption describes a different scene. Pairing `self` (completion):
the caption is item i's own, so the kept rows agree with it. keep_rows 0 is plain text-to-image for
the caption (the ceiling); the more rows are kept, the more of the kept scene is forced into the
image.
Results: docs/generation.md.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def evaluate_completion(bundle: Any, records: Sequence[Any], keep_rows: Sequence[int], seed: int = 0,
                        batch_size: int = 32, progress: bool = False, pairing: str = "other") -> dict[str, Any]:
    """Judge accuracy of completed images against the new caption (`new_*`) and against the
    caption of the image whose rows were kept (`source_*`), per number of kept rows. `records`:
    token shard rows with `meta["attrs"]` (the shapes world)."""
    from ernie_vilg.data.shapes_judge import judge_accuracy, judge_image
    from ernie_vilg.generation.pipelines import decode_image_ids, text_to_image_ids
    from ernie_vilg.runtime import progress_bar

    records = list(records)
    n = len(records)
    if n < 2 or not all("attrs" in r.meta for r in records):
        raise ValueError("completion is judged on shapes-world shards: need >= 2 records with meta['attrs']")
    grid = bundle.cfg.Model.image_grid
    bad = [k for k in keep_rows if not 0 <= k < grid]
    if bad:
        raise ValueError(f"--keep-rows must be in [0, {grid - 1}] (a {grid}-row grid), got {bad}")
    if pairing not in ("other", "self"):
        raise ValueError(f"pairing must be 'other' or 'self', got {pairing!r}")
    partner = [(i + n // 2) % n if pairing == "other" else i for i in range(n)]
    gold = np.stack([r.image_ids for r in records]).astype(np.int64)  # [n, h, w]
    width = bundle.cfg.Data.max_text_len
    out: dict[str, Any] = {"items": n, "grid": grid, "seed": seed, "pairing": pairing, "keep_rows": {}}
    bar = progress_bar(n * len(keep_rows), "completion", "image", progress)
    for k in keep_rows:
        new_res, src_res, kept_ok = [], [], 0
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            texts = [records[partner[i]].text for i in idx]
            prefix = gold[idx, :k].reshape(len(idx), -1) if k else None
            ids = text_to_image_ids(bundle, texts, 1, [seed + i for i in idx], text_width=width, prefix_ids=prefix)
            kept_ok += int((ids[:, :k] == gold[idx, :k]).all(axis=(1, 2)).sum()) if k else len(idx)
            for i, img in zip(idx, decode_image_ids(bundle.image_tokenizer, ids)):
                new_res.append(judge_image(img, records[partner[i]].meta["attrs"]))
                src_res.append(judge_image(img, records[i].meta["attrs"]))
            bar.update(len(idx))
        row = {f"new_{a}": v for a, v in judge_accuracy(new_res).items() if a != "n"}
        row.update({f"source_{a}": v for a, v in judge_accuracy(src_res).items() if a in ("all", "shape", "colour")})
        row["kept_rows_intact"] = kept_ok / n
        out["keep_rows"][str(k)] = row
    bar.close()
    return out
