"""Filter a manifest with the paper's rules (sec. 3.2.1; stated precisely in docs/data.md):

    python tools/filter_data.py --manifest M.jsonl --kept K.jsonl --rejected R.jsonl \
        [--max-words 15] [--reranker CKPT --threshold 0.5]

Prints a summary table (lines per outcome) on stderr and one JSON object on stdout.
"""
import argparse
import json
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="input JSONL manifest")
    parser.add_argument("--kept", required=True, help="output manifest of the kept lines")
    parser.add_argument("--rejected", required=True, help="output manifest of rejected lines (+ reject_reason)")
    parser.add_argument("--max-words", type=int, default=15, help="keep texts with fewer words than this")
    parser.add_argument("--reranker", default="", help="reranker checkpoint: enables the similarity rule")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep pairs with similarity > this")
    parser.add_argument("--batch-size", type=int, default=64, help="images per reranker batch")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the reranker (0 = all)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.data.filter import filter_manifest
        from ernie_vilg.models.reranker import reranker_scorer

        scorer = None
        if args.reranker:
            from ernie_vilg.runtime import configure_threads

            configure_threads(args.threads)
            scorer = reranker_scorer(args.reranker, args.batch_size)
        summary = filter_manifest(args.manifest, args.kept, args.rejected, args.max_words, scorer,
                                  args.threshold, progress=not args.no_progress)
        print(summary.table(), file=sys.stderr)
        print(json.dumps(summary.to_dict(), ensure_ascii=False))
        return 0

    from ernie_vilg.config import ConfigError
    from ernie_vilg.checkpoint_io import CheckpointError

    return run_or_exit(run, (ConfigError, CheckpointError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
