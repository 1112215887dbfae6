"""Text-to-image with a trained ERNIE-ViLG checkpoint:
`python tools/generate.py --ckpt DIR --text "..." [--num-candidates N] [--seed S] --out DIR`.

Writes one PNG per sample (`{text}_{candidate}.png`) and grid.png. Sampling settings (temperature,
top-k, top-p) come from the checkpoint's Generation config.
"""
import argparse
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="vilg checkpoint folder (or its run folder)")
    parser.add_argument("--text", action="append", required=True, help="prompt (repeatable)")
    parser.add_argument("--num-candidates", type=int, default=1, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.generation.pipelines import generate_to_folder
        from ernie_vilg.runtime import configure_threads

        configure_threads(args.threads)
        paths = generate_to_folder(args.ckpt, args.text, args.out, args.num_candidates, args.seed)
        print(f"wrote {len(paths)} images and grid.png to {args.out}")
        return 0

    from ernie_vilg.config import ConfigError
    from ernie_vilg.training.checkpoint import CheckpointError

    return run_or_exit(run, (ConfigError, CheckpointError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
