"""Human-evaluation kits (paper Tables 2, 5 and Appendix A).

    python tools/human_eval.py prompts [--suite configs/human_eval/prompts.yaml] --out prompts.jsonl
    python tools/human_eval.py sheet --kind image --images DIR [DIR ...] --out sheet.html [--seed 0]
    python tools/human_eval.py sheet --kind image|caption --items ITEMS.jsonl --out sheet.html
    python tools/human_eval.py aggregate --key sheet.html.key.json RATINGS.csv|json [...]

`sheet` writes a self-contained HTML file for raters plus a key file (which system made which
item) that stays with you; `aggregate` averages the raters' exported files per system and prints
the table and one JSON object. ITEMS lines: {"image": path, "caption"|"text": ..., "system": ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ernie_vilg.metrics.human_eval import (
    KINDS,
    RatingError,
    aggregate_ratings,
    build_sheet,
    format_table,
    items_from_folders,
    items_from_jsonl,
    load_prompt_suite,
    prompt_rows,
)

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "configs/human_eval/prompts.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="write the prompt suite as JSONL (id, aspect, text)")
    p.add_argument("--suite", default=str(DEFAULT_SUITE))
    p.add_argument("--out", required=True)
    s = sub.add_parser("sheet", help="build a blind HTML rating sheet")
    s.add_argument("--kind", choices=list(KINDS), default="image")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="folders of images (folder name = system)")
    src.add_argument("--items", help="JSONL of items: image, caption/text, optional system and id")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--title")
    a = sub.add_parser("aggregate", help="average filled-in ratings per system")
    a.add_argument("--key", required=True, help="the <sheet>.key.json written with the sheet")
    a.add_argument("ratings", nargs="+", help="exported CSV / JSON files, one per rater")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "prompts":
            rows = prompt_rows(load_prompt_suite(args.suite))
            Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            print(json.dumps({"prompts": len(rows), "out": args.out}))
        elif args.cmd == "sheet":
            items = items_from_folders(args.images) if args.images else items_from_jsonl(args.items)
            key = build_sheet(items, args.kind, args.out, seed=args.seed, title=args.title)
            print(json.dumps({"sheet": args.out, "key": str(key), "items": len(items)}))
        else:
            result = aggregate_ratings(args.ratings, args.key)
            print(format_table(result), file=sys.stderr)
            print(json.dumps(result, ensure_ascii=False))
    except RatingError as exc:
        parser.exit(2, f"human_eval: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
