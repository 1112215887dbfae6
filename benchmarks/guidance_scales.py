"""Classifier-free guidance scale sweep, both directions (docs/guidance.md).

    python benchmarks/guidance_scales.py --ckpt QS/vilg --shards QS/tokens/test \\
        --scales 0,1,1.5,2,3,5 [--caption-scales 0,1,1.5,2] [--max-items 200] [--out guidance]

For each text-to-image scale s, one image is sampled per item caption with the checkpoint's
Generation settings (temperature / top-k / top-p) at Generation.cfg_scale = s, using the same seed
at every scale. The images are judged with the shapes judge (image-level accuracy per attribute,
`judge_*`, only when the items carry shapes captions). For each caption scale, greedy captions of
the items' gold image tokens are scored at character level (`caption_CIDEr`, BLEU-4, ROUGE-L).
Scale 1 is the unguided row. The model must have been trained with Train.cond_drop > 0 for the
other rows to mean anything.

Prints JSON and a markdown table. With `--out PREFIX` it writes PREFIX.json and PREFIX.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

JUDGE_ATTRS = ("shape", "colour", "position", "size", "count", "all")
CAPTION_KEYS = ("caption_CIDEr", "caption_BLEU-4", "caption_ROUGE-L")


def parse_scales(text: str) -> list[float]:
    """'0,1,1.5' -> [0.0, 1.0, 1.5] (duplicates removed, order kept)."""
    out: list[float] = []
    for part in text.split(","):
        if part.strip():
            value = float(part)
            if value not in out:
                out.append(value)
    if not out:
        raise ValueError(f"no scales in {text!r}")
    return out


def measure(bundle: Any, records: Sequence[Any], scales: Sequence[float], caption_scales: Sequence[float],
            seed: int = 0, sample_batch: int = 256, progress: bool = False) -> dict[str, Any]:
    """The sweep on `records` (token shard records). Returns {"text_to_image": [row per scale],
    "captions": [row per caption scale]}; each row has `cfg_scale`, `seconds` and the metrics."""
    import paddle

    from ernie_vilg.generation.evaluate import caption_direction, image_direction

    records = list(records)
    t2i, captions = [], []
    with paddle.no_grad():
        for s in scales:
            t0 = time.time()
            metrics: dict[str, float] = {}
            if bundle.image_tokenizer is not None:
                metrics, _ = image_direction(bundle.model, bundle.text_tokenizer, bundle.image_tokenizer, records,
                                             bundle.cfg, seed, sample_batch=sample_batch, progress=progress,
                                             cfg_scale=s)
            row: dict[str, Any] = {"cfg_scale": s}
            row.update({f"judge_{a}": round(100.0 * metrics[f"judge_{a}"], 1)
                        for a in JUDGE_ATTRS if f"judge_{a}" in metrics})
            row["seconds"] = round(time.time() - t0, 1)
            t2i.append(row)
        for s in caption_scales:
            t0 = time.time()
            metrics, _ = caption_direction(bundle.model, bundle.text_tokenizer, records, bundle.cfg, cfg_scale=s)
            row = {"cfg_scale": s, **{k: round(float(metrics[k]), 4) for k in CAPTION_KEYS if k in metrics}}
            row["seconds"] = round(time.time() - t0, 1)
            captions.append(row)
    return {"text_to_image": t2i, "captions": captions}


def markdown(result: dict[str, Any]) -> str:
    """Two tables: text-to-image judge accuracy (%) and caption scores per scale."""
    lines = []
    for title, rows in (("text-to-image (judge accuracy, %)", result["text_to_image"]),
                        ("captions (greedy, character level)", result["captions"])):
        if not rows:
            continue
        keys = [k for k in rows[0] if k != "cfg_scale"]
        lines.append(f"| {title}: cfg_scale | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for row in rows:
            lines.append(f"| {row['cfg_scale']:g} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="vilg checkpoint folder (or run folder)")
    parser.add_argument("--shards", required=True, help="held-out token shard folder")
    parser.add_argument("--scales", default="0,1,1.5,2,3,5", help="text-to-image guidance scales")
    parser.add_argument("--caption-scales", default="", help="caption guidance scales (default: --scales)")
    parser.add_argument("--max-items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-batch", type=int, default=256, help="texts sampled together")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    args = parser.parse_args(argv)

    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg import pipeline
    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    scales = parse_scales(args.scales)
    caption_scales = parse_scales(args.caption_scales) if args.caption_scales else scales
    bundle = pipeline.load_bundle(args.ckpt, need_image_tokenizer=True)
    shards = TokenShards(args.shards)
    records = [shards[i] for i in range(min(args.max_items, len(shards)))]
    gen = bundle.cfg.Generation
    result = {"benchmark": "guidance_scales", "ckpt": str(args.ckpt), "shards": str(args.shards),
              "items": len(records), "seed": args.seed,
              "sampling": {"temperature": gen.temperature, "top_k": gen.top_k, "top_p": gen.top_p},
              "train_cond_drop": bundle.cfg.Train.cond_drop,
              **measure(bundle, records, scales, caption_scales, args.seed, args.sample_batch, progress=True)}
    table = markdown(result)
    print(json.dumps(result, ensure_ascii=False))
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        Path(f"{out}.md").write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
