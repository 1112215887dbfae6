"""The image tokenizer's ceiling for text-to-image on the shapes world: decode the gold token
grids of held-out images and judge them against their ground truth.

    python benchmarks/tokenizer_ceiling.py --ckpt RUN/checkpoints/step-000900 \\
        --manifest W/test.jsonl [--max-items 200] [--out ceiling.json]
    python benchmarks/tokenizer_ceiling.py --ckpt QS/vq/checkpoints/step-000900 --shards QS/tokens/test

With `--manifest` the gold grids are the tokenizer's own encoding of the manifest images (what
`tokenize_manifest` writes); with `--shards` they are read from a token shard folder (the
sequences stage 2 trains on and is scored against), and the claims come from the shards' `attrs`
metadata (or from `--manifest`, matched by image path, when the shards lack it). A generator that
emits exactly these tokens scores what this prints, so no text-to-image model on this tokenizer
can beat it.

`--against attrs` (default) judges against the ground-truth attributes, the strictest reading of
any caption; `--against text` parses each item's `text` caption instead (t6's relations allow
more cells, so it is at most as strict).

Prints and writes (`--out`) JSON: `judge_gold_{shape,colour,position,size,count,all}`, the
object-level `judge_gold_object_*`, and a breakdown: object-level shape and size accuracy per
claimed shape and per claimed size and the shape confusion (claimed -> judged) of the matched objects.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def breakdown(results: list[Any]) -> dict[str, Any]:
    """Object-level accuracies per claimed shape and the claimed -> judged shape confusion."""
    per_shape: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # shape_ok, size_ok, n
    per_size: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # size_ok, shape_ok, n
    confusion: Counter = Counter()
    for res in results:
        for obj in res.objects:
            shape = obj.claim["shape"]
            per_shape[shape][0] += obj.shape_ok
            per_shape[shape][1] += obj.size_ok
            per_shape[shape][2] += 1
            if obj.claim.get("size") is not None:
                per_size[obj.claim["size"]][0] += obj.size_ok
                per_size[obj.claim["size"]][1] += obj.shape_ok
                per_size[obj.claim["size"]][2] += 1
            confusion[f"{shape}->{obj.match.shape if obj.match else 'none'}"] += 1
    return {
        "object_shape_by_shape": {k: round(v[0] / v[2], 4) for k, v in sorted(per_shape.items())},
        "object_size_by_shape": {k: round(v[1] / v[2], 4) for k, v in sorted(per_shape.items())},
        "object_size_by_size": {k: round(v[0] / v[2], 4) for k, v in sorted(per_size.items())},
        "object_shape_by_size": {k: round(v[1] / v[2], 4) for k, v in sorted(per_size.items())},
        "shape_confusion": dict(sorted(confusion.items())),
    }


def _claim(meta: dict[str, Any], text: str, against: str) -> Any:
    if against == "text":
        return text
    if "attrs" not in meta:
        raise KeyError("no `attrs` for an item: pass a shapes manifest, or use --against text")
    return meta["attrs"]


def load_gold(tokenizer: Any, ckpt_image_size: int, manifest: Optional[str], shards: Optional[str],
              max_items: int, against: str) -> tuple[np.ndarray, list[Any]]:
    """Gold token grids [N, h, w] and the N claims they are judged against."""
    from ernie_vilg.data.manifest import read_manifest
    from ernie_vilg.vq.evaluate import gold_ids_of_records

    records = read_manifest(manifest) if manifest else None
    if shards:
        from ernie_vilg.data.token_shards import TokenShards

        ts = TokenShards(shards)
        n = min(len(ts), max_items) if max_items > 0 else len(ts)
        by_image = {Path(r.image_path).name: r for r in records} if records else {}
        ids, claims = [], []
        for i in range(n):
            rec = ts[i]
            meta, text = rec.meta, rec.text
            if "attrs" not in meta and by_image:
                name = Path(meta.get("image", "")).name
                if name not in by_image:
                    raise KeyError(f"{shards} item {i}: image {name!r} is not in {manifest}")
                meta, text = by_image[name].extra, by_image[name].text
            ids.append(rec.image_ids)
            claims.append(_claim(meta, text, against))
        return np.stack(ids), claims
    if not records:
        raise SystemExit("tokenizer_ceiling: give --manifest (and/or --shards)")
    if max_items > 0:
        records = records[:max_items]
    ids = gold_ids_of_records(tokenizer, records, ckpt_image_size)
    return ids, [_claim(r.extra, r.text, against) for r in records]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="tokenizer checkpoint folder (model.pdparams + config.yaml)")
    ap.add_argument("--manifest", help="shapes manifest (e.g. W/test.jsonl); encoded by the tokenizer "
                                       "unless --shards is given")
    ap.add_argument("--shards", help="token shard folder with the gold grids (e.g. QS/tokens/test)")
    ap.add_argument("--max-items", type=int, default=200, help="first N items (0 = all; default 200)")
    ap.add_argument("--against", choices=("attrs", "text"), default="attrs",
                    help="judge against ground-truth attrs (default) or the parsed `text` caption")
    ap.add_argument("--image-size", type=int, default=0, help="override the checkpoint's Data.image_size")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)

    from ernie_vilg.runtime import configure_threads
    from ernie_vilg.checkpoint_io import load_checkpoint_config
    from ernie_vilg.vq.registry import load_tokenizer
    from ernie_vilg.vq.evaluate import judge_gold_reconstructions

    configure_threads(args.threads)
    ckpt_dir, cfg = load_checkpoint_config(args.ckpt)
    tokenizer = load_tokenizer(ckpt_dir)
    tokenizer.eval()
    size = args.image_size or cfg.Data.image_size
    ids, claims = load_gold(tokenizer, size, args.manifest, args.shards, args.max_items, args.against)
    acc, results = judge_gold_reconstructions(tokenizer, ids, claims, return_results=True)
    report = {"ckpt": str(ckpt_dir), "manifest": args.manifest, "shards": args.shards,
              "against": args.against, "grid": list(ids.shape[1:]), **acc, "breakdown": breakdown(results)}
    text = json.dumps(report, ensure_ascii=False, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
