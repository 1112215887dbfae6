"""Table 7 of the paper at shapes scale: two-stage vs end-to-end text-to-image, five rows.

    python tools/ablate_e2e.py --shapes DIR --tokenizer CKPT --out DIR --steps N [--minutes M]
        [--num-eval 100] [--fid-weights /tmp/fidw] [-o Section.key=value ...]

Trains stage `vilg` and stage `vilg_e2e` with the same config and budget, then prints FID (when
converted Inception weights are given) and shapes-judge accuracy of each row; writes
OUT/table7.json and the images of every row under OUT/eval/.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", required=True, help="shapes world folder (train/val/test.jsonl)")
    p.add_argument("--tokenizer", required=True, help="image tokenizer checkpoint (dVAE in the paper)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True, help="training steps of EACH variant")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-time cap of each run (0 = none)")
    p.add_argument("--num-eval", type=int, default=100)
    p.add_argument("--config", default="configs/vilg/shapes_e2e.yaml")
    p.add_argument("--fid-weights", default=None, help="folder with inception_fid.pdparams")
    p.add_argument("-o", dest="override", action="append", default=[])
    args = p.parse_args(argv)
    from ernie_vilg.experiments.table7 import format_table, run_ablation
    from ernie_vilg.runtime import setup_logging

    setup_logging()
    summary = run_ablation(args.shapes, args.tokenizer, args.out, args.steps, args.minutes, args.num_eval,
                           args.config, args.fid_weights, args.override)
    print(format_table(summary))
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
