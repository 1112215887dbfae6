"""Table 7 of the paper at shapes scale: two-stage vs end-to-end text-to-image, five rows, over
seeds (the runner is `ernie_vilg/experiments/table7.py`; docs/paper_claims.md has the figures).

    # train both variants for every seed (same seeds, batches, steps), evaluate every seed
    # (FID on --num-eval generated vs real test images + the shapes judge), OUT/summary.{md,json};
    # resumable, and two processes of the same command share the work
    python tools/ablate_e2e.py run --data DIR --tokenizer DVAE_CKPT --out OUT --seeds 0 1 2 \\
        --steps 3400 --num-eval 1000 --fid-weights W [-o Section.key=value ...]
    # a variant against a finished baseline: its shared part and two-stage generators reused
    python tools/ablate_e2e.py run ... --out OUT2 --shared-from OUT --two-stage-from OUT -o E2E.rec_weight=100
    python tools/ablate_e2e.py summary --out OUT        # the mean / spread table of the finished seeds
    python tools/ablate_e2e.py gradients --run OUT/s0/end_to_end   # reconstruction vs generation gradient
    python tools/ablate_e2e.py floor --images OUT/shared/row4_1000 --real OUT/shared/real_1000 \\
        --real-stats OUT/shared/real_stats_1000.npz --out DIR --fid-weights W   # pixel-noise floor of a row
    python tools/ablate_e2e.py grid --out OUT --seed 0 --dest t7.png [--amplify 40]   # look at the rows
    python tools/ablate_e2e.py tokenizer --ckpt DVAE_CKPT --data DIR   # the tokenizer's ceiling

Exit code 2 with one line on stderr for a bad input (missing folder, checkpoint of another stage,
a reused run that does not fit).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def _parser() -> argparse.ArgumentParser:
    from ernie_vilg.experiments.table7 import DEFAULT_CONFIG

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate (resumable, shareable by two processes)")
    r.add_argument("--data", required=True, help="shapes world folder (train/val/test.jsonl)")
    r.add_argument("--tokenizer", required=True, help="dVAE checkpoint (the tokenizer and two-stage reconstructor)")
    r.add_argument("--out", required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=3400, help="training steps of each variant")
    r.add_argument("--save-every", type=int, default=500, help="checkpoint interval (the resume points)")
    r.add_argument("--num-eval", type=int, default=1000, help="test captions (one sample each) and real images")
    r.add_argument("--fid-weights", default=None, help="converted Inception weights (tools/eval_fid.py --fetch-weights)")
    r.add_argument("--threads", type=int, default=1, help="threads of the evaluation")
    r.add_argument("--config", default=str(DEFAULT_CONFIG), help="the recipe of both variants")
    r.add_argument("--train-only", action="store_true")
    r.add_argument("--shared-from", default=None, help="another run's OUT: reuse its tokens, real statistics, row 4")
    r.add_argument("--two-stage-from", default=None,
                   help="another run's OUT: reuse its two-stage generators and row 1 (train only the end-to-end variant)")
    r.add_argument("-o", dest="override", action="append", default=[], help="Section.key=value, both variants")
    s = sub.add_parser("summary", help="the mean / spread table of the finished seeds")
    s.add_argument("--out", required=True)
    g = sub.add_parser("gradients", help="reconstruction vs generation gradient on the generator (an end-to-end run)")
    g.add_argument("--run", required=True, help="an end-to-end run folder, e.g. OUT/s0/end_to_end")
    g.add_argument("--batches", type=int, default=8)
    g.add_argument("--from-init", action="store_true", help="at the initial weights, not the newest checkpoint")
    f = sub.add_parser("floor", help="pixel-noise-floor diagnostic of one row's images")
    f.add_argument("--images", required=True, help="a row's PNG folder, e.g. OUT/shared/row4_1000")
    f.add_argument("--real", required=True, help="the real images' PNG folder (same file names)")
    f.add_argument("--real-stats", required=True, help="their FID statistics (OUT/shared/real_stats_1000.npz)")
    f.add_argument("--out", required=True)
    f.add_argument("--fid-weights", required=True)
    f.add_argument("--max-value", type=int, default=3)
    v = sub.add_parser("grid", help="PNG: test captions x (real image, the five rows) of one seed")
    v.add_argument("--out", required=True, help="the run's OUT")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--dest", required=True, help="the PNG to write (and DEST.txt: the captions)")
    v.add_argument("--num", type=int, default=8)
    v.add_argument("--first", type=int, default=0, help="index of the first test caption")
    v.add_argument("--amplify", type=float, default=1.0, help="multiply pixel values (40: show a faint background)")
    t = sub.add_parser("tokenizer", help="reconstruction ceiling of a tokenizer on the test split")
    t.add_argument("--ckpt", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--num", type=int, default=1000)
    return p


def _dispatch(args: argparse.Namespace) -> int:
    from ernie_vilg.experiments import table7
    from ernie_vilg.runtime import configure_threads, setup_logging

    setup_logging()
    if args.cmd == "run":
        opts = table7.Table7Run(
            data=Path(args.data), tokenizer=Path(args.tokenizer), out=Path(args.out), seeds=args.seeds,
            steps=args.steps, save_every=args.save_every, num_eval=args.num_eval,
            fid_weights=Path(args.fid_weights) if args.fid_weights else None, threads=args.threads,
            config=Path(args.config), train_only=args.train_only, override=args.override,
            shared_from=Path(args.shared_from) if args.shared_from else None,
            two_stage_from=Path(args.two_stage_from) if args.two_stage_from else None)
        summary = table7.run_table7(opts)
        print(table7.format_markdown(summary) if summary["rows"] else "no finished seed yet")
        return 0
    if args.cmd == "summary":
        if not Path(args.out).is_dir():
            raise table7.Table7Error(f"--out {args.out}: no such folder")
        summary = table7.summarize(Path(args.out))
        print(table7.format_markdown(summary) if summary["rows"] else "no finished seed yet")
        return 0
    if args.cmd == "grid":
        print(table7.sample_grid(Path(args.out), args.seed, Path(args.dest), args.num, args.first, args.amplify))
        return 0
    configure_threads(1)
    if args.cmd == "gradients":
        result = table7.gradient_balance(Path(args.run), args.batches, args.from_init)
    elif args.cmd == "floor":
        result = table7.noise_floor(Path(args.images), Path(args.real), Path(args.real_stats), Path(args.out),
                                    Path(args.fid_weights), args.max_value)
    else:
        result = table7.tokenizer_ceiling(args.ckpt, args.data, args.num)
    print(json.dumps(result, indent=1))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from ernie_vilg.config import ConfigError
    from ernie_vilg.experiments.table7 import Table7Error

    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (Table7Error, ConfigError, FileNotFoundError) as e:
        print(f"ablate_e2e: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
