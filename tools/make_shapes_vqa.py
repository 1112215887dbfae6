"""Shapes-world VQA set from a shapes manifest (questions about colour, shape, count, position):

    python tools/make_shapes_vqa.py --manifest SHAPES/train.jsonl --out SHAPES/vqa_train.jsonl \
        [--per-image 3] [--seed 0]

Prints a JSON summary (questions per kind).
"""
import argparse
import json
import sys

from ernie_vilg.data.shapes_vqa import QTYPES, make_vqa_manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="shapes manifest (lines carry `attrs`)")
    parser.add_argument("--out", required=True, help="output VQA manifest (JSONL)")
    parser.add_argument("--per-image", type=int, default=3, help="questions per image (distinct kinds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qtypes", default=",".join(QTYPES), help=f"comma-separated subset of {','.join(QTYPES)}")
    args = parser.parse_args()
    try:
        summary = make_vqa_manifest(args.manifest, args.out, args.per_image, args.seed,
                                    tuple(q for q in args.qtypes.split(",") if q))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
