"""One token shard folder over several finished ones, for training on all of them:
`python tools/combine_shards.py --out D SRC [SRC ...]`.

The new folder holds symlinks to the sources' shard files (nothing is copied or moved) and one
info.json listing them in the given order; the sources must share grid, codebook size and dtype
(i.e. come from the same image tokenizer). Use it as `-o Data.train_shards=D`."""
import argparse
import json
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="token shard folders (tools/tokenize_images.py outputs)")
    parser.add_argument("--out", required=True, help="new folder (must not be a shard folder already)")
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.vq.parallel_tokenize import link_shard_folders

        info = link_shard_folders(args.sources, args.out)
        print(json.dumps({"out": args.out, "count": info["count"], "shards": len(info["shards"]),
                          "sources": info["sources"]}, ensure_ascii=False))
        return 0

    from ernie_vilg.data.token_shards import TokenShardError

    return run_or_exit(run, (TokenShardError,))


if __name__ == "__main__":
    sys.exit(main())
