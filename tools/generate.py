"""Text-to-image with a trained ERNIE-ViLG checkpoint:
`python tools/generate.py --ckpt DIR --text "..." [--num-candidates N] [--seed S] --out DIR`.

Writes one PNG per sample (`{text}_{candidate}.png`) and grid.png. Sampling settings (temperature,
top-k, top-p) come from the checkpoint's Generation config.

Best-of-N (paper sec. 4.2): `--num-candidates N --keep K [--reranker RERANKER_DIR]
[--rank-by reranker|likelihood|both]` samples N images per text, ranks them by the contrastive
reranker and/or the model's own caption likelihood of each image, and writes only the best K
(`{text}_rank{r}.png`), a grid of all N per text best first (kept ones framed green) and
ranking.json with every score.

An `--out` folder that already holds files needs `--overwrite` (files of the same name are replaced).

Classifier-free guidance (docs/guidance.md): `--cfg-scale S` replaces the checkpoint's
Generation.cfg_scale (1 = off; useful only for a model trained with Train.cond_drop > 0).
"""
import argparse
import sys

from ernie_vilg.cli.common import check_generate_args, run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="vilg checkpoint folder (or its run folder)")
    parser.add_argument("--text", action="append", required=True, help="prompt (repeatable)")
    parser.add_argument("--num-candidates", type=int, default=1, help="images per prompt")
    parser.add_argument("--keep", type=int, default=0,
                        help="best-of-N: keep the best K of --num-candidates per text (0 = keep all, unranked)")
    parser.add_argument("--reranker", default="", help="reranker checkpoint folder (tools/train.py, stage reranker)")
    parser.add_argument("--rank-by", default="", choices=["", "reranker", "likelihood", "both"],
                        help="ranking signal (default: reranker if --reranker is given, else likelihood)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the checkpoint's Generation.cfg_scale; 1 = off)")
    parser.add_argument("--out", required=True, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out folder that already has files")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    args = parser.parse_args()
    check_generate_args(args)  # one line and exit 2 before the model loads

    def run() -> int:
        from ernie_vilg.generation.pipelines import generate_to_folder
        from ernie_vilg.runtime import configure_threads

        configure_threads(args.threads)
        paths = generate_to_folder(args.ckpt, args.text, args.out, args.num_candidates, args.seed,
                                   keep=args.keep, reranker=args.reranker or None, rank_by=args.rank_by,
                                   cfg_scale=args.cfg_scale)
        print(f"wrote {len(paths)} images and grid.png to {args.out}")
        return 0

    from ernie_vilg.config import ConfigError
    from ernie_vilg.training.checkpoint import CheckpointError

    return run_or_exit(run, (ConfigError, CheckpointError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
