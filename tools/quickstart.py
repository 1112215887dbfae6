"""Quickstart: shapes world -> image tokenizer -> token shards -> ERNIE-ViLG -> evaluation.

`python tools/quickstart.py [--out DIR]` runs the whole pipeline on this CPU (about 15 minutes
on 2 cores) and writes DIR/metrics.json, DIR/captions.jsonl and DIR/samples/grid.png.
Re-running resumes: finished stages are skipped.
"""
import argparse
import json
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long version of the same pipeline")
    parser.add_argument("--long", action="store_true",
                        help="the convergence study's long recipe (configs/vilg/shapes_long.yaml, about an hour "
                             "of stage 5; shares stages 1-4 with the quickstart in --out; writes OUT/vilg_long and "
                             "OUT/long/metrics.json)")
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.quickstart import LONG_PLAN, SMOKE_PLAN, QuickstartPlan, run_quickstart
        from ernie_vilg.runtime import setup_logging

        setup_logging()
        if args.smoke and args.long:
            raise ConfigError("--smoke and --long are two different plans: pick one")
        plan = SMOKE_PLAN if args.smoke else LONG_PLAN if args.long else QuickstartPlan()
        result = run_quickstart(args.out, plan, args.threads)
        print(json.dumps(result["metrics"], ensure_ascii=False, indent=1))
        where = f"{args.out}/{plan.eval_dir}" if plan.eval_dir else args.out
        print(f"wrote {where}/metrics.json ({result['seconds']['total'] / 60:.1f} min)")
        return 0

    from ernie_vilg.config import ConfigError

    return run_or_exit(run, (ConfigError,))


if __name__ == "__main__":
    sys.exit(main())
