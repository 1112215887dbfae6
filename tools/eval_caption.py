"""Score generated captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D on the paper's 0-100 scale.

    python tools/eval_caption.py --pred PRED.jsonl --ref REF.jsonl [--tokenization char|word]

PRED lines {"id": ..., "caption": "..."}; REF lines {"id": ..., "captions": ["...", ...]}.
Prints one JSON object; METEOR is null with METEOR_error when Java is unavailable.
"""
from __future__ import annotations

import argparse
import json

from ernie_vilg.metrics.caption import TOKENIZATIONS, CaptionDataError, evaluate_caption_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="PRED JSONL: {\"id\", \"caption\"} per line")
    parser.add_argument("--ref", required=True, help="REF JSONL: {\"id\", \"captions\": [...]} per line")
    parser.add_argument("--tokenization", default="char", choices=TOKENIZATIONS,
                        help="char (paper, default), word (jieba, as AIC-ICC), whitespace (already segmented)")
    args = parser.parse_args(argv)
    try:
        scores = evaluate_caption_files(args.pred, args.ref, args.tokenization)
    except CaptionDataError as exc:
        parser.exit(2, f"eval_caption: error: {exc}\n")
    print(json.dumps(scores, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
