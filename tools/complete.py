"""Image completion measured on the shapes world (docs/generation.md, "Image completion"):

    python tools/complete.py --ckpt RUN/vilg --shards RUN/tokens/test \
        [--keep-rows 0 1 2 3] [--items 64] [--seed 0] [--pairing other|self] [--out completion.json]

Keeps the top rows of each image's tokens and generates the rest for another item's caption
(`other`: editing) or its own (`self`: completion); prints the shapes judge's accuracy against the
new caption and the kept image's, per number of kept rows (`generation.completion`).
"""
import argparse
import json
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="vilg checkpoint folder, run folder or pretrained folder")
    parser.add_argument("--shards", required=True, help="shapes-world token shards (e.g. RUN/tokens/test)")
    parser.add_argument("--keep-rows", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--items", type=int, default=64, help="first N records (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairing", choices=["other", "self"], default="other",
                        help="other: another item's caption (editing); self: the item's own caption (completion)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--out", default=None, help="also write the result JSON here")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.data.token_shards import TokenShards
        from ernie_vilg.generation.completion import evaluate_completion
        from ernie_vilg.pipeline import load_bundle
        from ernie_vilg.runtime import configure_threads

        configure_threads(args.threads)
        bundle = load_bundle(args.ckpt, need_image_tokenizer=True)
        if args.cfg_scale is not None:
            bundle.cfg.Generation.cfg_scale = args.cfg_scale
        shards = TokenShards(args.shards)
        count = len(shards) if args.items <= 0 else min(args.items, len(shards))
        result = evaluate_completion(bundle, [shards[i] for i in range(count)], args.keep_rows, args.seed,
                                     progress=True, pairing=args.pairing)
        result["ckpt"] = str(bundle.ckpt_dir)
        text = json.dumps(result, ensure_ascii=False, indent=1)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        print(text)
        return 0

    from ernie_vilg.checkpoint_io import CheckpointError
    from ernie_vilg.config import ConfigError
    from ernie_vilg.data.token_shards import TokenShardError

    return run_or_exit(run, (ConfigError, CheckpointError, TokenShardError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
