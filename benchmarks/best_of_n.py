"""Best-of-N vs a single sample on the shapes world: judge accuracy of the image each policy keeps.

    python benchmarks/best_of_n.py --ckpt QS/vilg --shards QS/tokens/test --reranker RR/run \
        --num-prompts 100 --num-candidates 8

For each of the first P test items the model samples N images for the item's caption (one seeded
batch per item, the checkpoint's Generation settings); every candidate is judged against that
caption (data/shapes_judge.py). Rows (image-level judge accuracy per attribute):
  single (mean over candidates)  expected accuracy of one sample: every candidate counts 1/N
  single (candidate 0)           what `--num-candidates 1` would have kept with this seed
  best-of-N by <signal>          the candidate ranked first by reranker / likelihood / both
  oracle                         some candidate is right (the ceiling of any ranking)
All policies see the same candidates, so the differences come from the ranking alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

ATTRS = ("shape", "colour", "position", "count", "all")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="vilg checkpoint folder (or run folder)")
    parser.add_argument("--shards", required=True, help="token shard folder of shapes test items")
    parser.add_argument("--reranker", default="", help="reranker checkpoint (omit: likelihood only)")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--num-candidates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import paddle
    from tqdm import tqdm

    from ernie_vilg.data.shapes_judge import judge_image
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.generation.best_of_n import rank_candidates_by, score_candidates
    from ernie_vilg.generation.pipelines import decode_image_ids, text_to_image_ids
    from ernie_vilg.pipeline import load_bundle
    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    bundle = load_bundle(args.ckpt, need_image_tokenizer=True)
    reranker = None
    if args.reranker:
        from ernie_vilg.models.reranker import load_reranker

        reranker = load_reranker(args.reranker)
    signals = ["likelihood"] + (["reranker", "both"] if reranker is not None else [])
    shards = TokenShards(args.shards)
    n_items = min(args.num_prompts, len(shards))
    policies = ["single (mean over candidates)", "single (candidate 0)"] + [f"best-of-N by {s}" for s in signals]
    policies.append("oracle")
    hits = {p: {a: 0.0 for a in ATTRS} for p in policies}
    t0 = time.time()
    with paddle.no_grad():
        for i in tqdm(range(n_items), desc=f"best-of-{args.num_candidates}", unit="prompt"):
            text = shards[i].text
            ids = text_to_image_ids(bundle, [text], args.num_candidates, seed=args.seed + i)
            images = decode_image_ids(bundle.image_tokenizer, ids)
            oks = [judge_image(img, text).to_dict() for img in images]
            ok = {a: np.array([bool(o[f"{a}_ok"]) for o in oks], dtype=np.float64) for a in ATTRS}
            scores = score_candidates(bundle, text, images, ids, "both" if reranker is not None else "likelihood",
                                      reranker)
            for a in ATTRS:
                hits["single (mean over candidates)"][a] += ok[a].mean()
                hits["single (candidate 0)"][a] += ok[a][0]
                hits["oracle"][a] += ok[a].max()
                for s in signals:
                    hits[f"best-of-N by {s}"][a] += ok[a][rank_candidates_by(scores, s)[0]]
    seconds = time.time() - t0
    table = {p: {a: round(100.0 * v / n_items, 1) for a, v in row.items()} for p, row in hits.items()}
    print(json.dumps({"benchmark": "best_of_n", "ckpt": args.ckpt, "prompts": n_items,
                      "num_candidates": args.num_candidates, "seconds": round(seconds, 1), "accuracy": table},
                     ensure_ascii=False))
    print(f"\n| policy (N = {args.num_candidates}, {n_items} prompts) | " + " | ".join(ATTRS) + " |")
    print("|---" * (len(ATTRS) + 1) + "|")
    for p, row in table.items():
        print(f"| {p} | " + " | ".join(f"{row[a]:.1f} %" for a in ATTRS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
