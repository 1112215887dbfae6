"""Write the synthetic shapes dataset (images + train/val/test manifests with ground truth).

    python tools/make_shapes.py --out data/shapes --num-train 5000 --num-val 200 --num-test 500 \
        --size 64 --seed 0 [--max-objects 3]
"""
from __future__ import annotations

import argparse
import json

from ernie_vilg.data.shapes import BACKGROUNDS, TEMPLATES, write_shapes_dataset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (images/ and *.jsonl go here)")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--shapes", nargs="+", default=None, help="subset of shape names (Chinese)")
    p.add_argument("--colours", nargs="+", default=None, help="subset of colour names (Chinese)")
    p.add_argument("--background", default="黑色", choices=list(BACKGROUNDS))
    p.add_argument("--no-jitter", action="store_true", help="centre every object in its cell")
    p.add_argument("--num-texts", type=int, default=5, help="paraphrases per image")
    p.add_argument("--text-template", default=None, choices=list(TEMPLATES),
                   help="make `text` always this template (default: one of `texts` by seed)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    counts = write_shapes_dataset(
        a.out, a.num_train, a.num_val, a.num_test, size=a.size, seed=a.seed,
        min_objects=a.min_objects, max_objects=a.max_objects, shapes=a.shapes, colours=a.colours,
        background=a.background, jitter=not a.no_jitter, num_texts=a.num_texts,
        text_template=a.text_template, progress=not a.no_progress,
    )
    print(json.dumps({"out": str(a.out), "counts": counts}, ensure_ascii=False))


if __name__ == "__main__":
    main()
