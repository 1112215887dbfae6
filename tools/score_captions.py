"""Caption metrics (character level, the paper's protocol) of a vilg checkpoint on token shards:

    python tools/score_captions.py --ckpt DIR --shards DIR [--strategy beam --beam-size 3]
        [--max-items N] [--meteor] [--out captions.jsonl]

Prints one JSON object: the decoding settings and `caption_BLEU-1..4`, `caption_ROUGE-L`,
`caption_CIDEr` (and `caption_METEOR` with --meteor, which needs Java). The same decoding and
scoring as caption fine-tuning's validation (docs/finetune.md), before or after fine-tuning.
"""
import argparse
import json
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (step folder, best/ or run folder)")
    parser.add_argument("--shards", required=True, help="token shard folder (e.g. the test split)")
    parser.add_argument("--strategy", choices=("greedy", "beam"), default=None, help="default: the checkpoint's")
    parser.add_argument("--beam-size", type=int, default=None)
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--max-items", type=int, default=0, help="0 = every row")
    parser.add_argument("--meteor", action="store_true", help="also METEOR (needs Java)")
    parser.add_argument("--out", default=None, help="write the captions here (JSONL)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.checkpoint_io import load_checkpoint_config
        from ernie_vilg.generation.captions import score_bundle
        from ernie_vilg.pipeline import load_bundle
        from ernie_vilg.runtime import configure_threads

        configure_threads(args.threads)
        _, cfg = load_checkpoint_config(args.ckpt)
        gen = cfg.Generation
        gen.decode_strategy = args.strategy or gen.decode_strategy
        gen.beam_size = args.beam_size if args.beam_size is not None else gen.beam_size
        gen.length_penalty = args.length_penalty if args.length_penalty is not None else gen.length_penalty
        metrics, rows = score_bundle(load_bundle(args.ckpt), args.shards, gen, args.max_items, args.meteor)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(json.dumps({"strategy": gen.decode_strategy, "beam_size": gen.beam_size, **metrics}, ensure_ascii=False))
        return 0

    from ernie_vilg.checkpoint_io import CheckpointError
    from ernie_vilg.config import ConfigError
    from ernie_vilg.data.token_shards import TokenShardError

    return run_or_exit(run, (ConfigError, CheckpointError, TokenShardError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
