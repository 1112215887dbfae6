"""Stage 5 of the quickstart again, with config overrides, on an existing quickstart folder.

    # the session-8 ablations: 2,000 fixed steps, one process of one thread per run, two runs at a
    # time pinned to the two cores (quality only: the step count is fixed, so load does not change it)
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/recipe_ablation.py --qs runs/quickstart --name geglu \
        --processes 1 --threads 1 -o Train.max_steps=2000 Train.max_minutes=0 Train.eval_every=2000 \
        Train.save_every=1000 Model.ffn_act=geglu

Stages 1-4 (world, tokenizer, shards, vocab) are reused from `--qs` (a finished `tools/quickstart.py
--out QS`); stage 5 trains into `QS/exp_NAME` with `configs/vilg/shapes.yaml` plus the overrides, and
the quickstart's evaluation (200 test captions: one sample, best of 8, captions, the tokenizer's
gold ceiling) writes `QS/eval_NAME/metrics.json`. Prints one RESULT line and writes
`QS/eval_NAME/ablation.json` (overrides, judge rows, BLEU@4, stage-5 seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

KEYS = ("shape", "colour", "position", "size", "count", "all")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qs", required=True, help="a finished quickstart output folder (stages 1-4 are reused)")
    p.add_argument("--name", required=True, help="run name: QS/exp_NAME (training), QS/eval_NAME (evaluation)")
    p.add_argument("--processes", type=int, default=2, help="stage-5 data-parallel processes (the quickstart's: 2)")
    p.add_argument("--threads", type=int, default=0, help="threads of this process (0 = all cores)")
    p.add_argument("-o", "--override", nargs="*", default=[], help="config overrides KEY=VALUE for stage 5")
    args = p.parse_args(argv)
    qs = Path(args.qs)
    if not (qs / "vocab.txt").is_file() or not (qs / "tokens" / "train").is_dir():
        print(f"error: {qs} is not a finished quickstart folder (no vocab.txt / tokens/train)", file=sys.stderr)
        return 2

    import ernie_vilg  # noqa: F401  (runtime flags before paddle loads)
    from ernie_vilg.quickstart import QuickstartPlan, run_quickstart

    plan = replace(QuickstartPlan(), vilg_dir=f"exp_{args.name}", eval_dir=f"eval_{args.name}",
                   vilg_overrides=tuple(args.override), vilg_processes=args.processes)
    result = run_quickstart(qs, plan, threads=args.threads)
    m = result["metrics"]
    row = {"name": args.name, "overrides": list(args.override),
           "single": {k: 100 * m[f"judge_{k}"] for k in KEYS if f"judge_{k}" in m},
           "best_of_8": {k: 100 * m[f"judge_best_of_8_{k}"] for k in KEYS if f"judge_best_of_8_{k}" in m},
           "bleu4": m.get("caption_BLEU-4"), "vilg_seconds": result["seconds"].get("vilg")}
    (qs / f"eval_{args.name}" / "ablation.json").write_text(json.dumps(row, indent=1), encoding="utf-8")
    print("RESULT", json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
