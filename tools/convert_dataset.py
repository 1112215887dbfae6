"""Convert a released dataset to the project's JSONL manifest (and a REF JSONL for eval_caption).

    python tools/convert_dataset.py --format aic_icc|coco_cn|fmiqa|coco --input FILE_OR_DIR [...] \
        --images DIR --out manifest.jsonl [--split train|val|test|SPLIT_FILE] [--ref-out REF.jsonl]

Items whose image is missing under --images are skipped and counted (--no-check-images keeps
them). Prints a JSON report: items read, lines written, missing images.
"""
from __future__ import annotations

import argparse
import json

from ernie_vilg.data.readers import FORMATS, DatasetFormatError, convert_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--input", required=True, nargs="+",
                        help="annotation file(s); for coco_cn the release folder, caption file(s) or the merged JSON")
    parser.add_argument("--images", required=True, help="folder holding the images")
    parser.add_argument("--out", required=True, help="manifest JSONL to write")
    parser.add_argument("--split", help="coco_cn: train/val/test or a split file; fmiqa: train/val")
    parser.add_argument("--ref-out", help="also write REF JSONL ({id, captions}) for tools/eval_caption.py")
    parser.add_argument("--no-check-images", action="store_true", help="do not check that image files exist")
    parser.add_argument("--per-caption", action="store_true", help="one manifest line per caption")
    args = parser.parse_args(argv)
    try:
        report = convert_dataset(args.format, args.input, args.images, args.out, split=args.split,
                                 ref_out=args.ref_out, check_images=not args.no_check_images,
                                 per_caption=args.per_caption)
    except DatasetFormatError as exc:
        parser.exit(2, f"convert_dataset: error: {exc}\n")
    print(json.dumps(report.as_dict(), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
