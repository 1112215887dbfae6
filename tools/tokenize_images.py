"""Write token shards for transformer training:
`python tools/tokenize_images.py --ckpt VQ_DIR --manifest M --out S`."""
import argparse
import json
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, help="image tokenizer checkpoint folder (or its run folder)")
    parser.add_argument("--manifest", required=True, help="JSONL manifest of image-text pairs")
    parser.add_argument("--out", required=True, help="output folder for the token shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=10000, help="rows per shard file")
    parser.add_argument("--image-size", type=int, default=0, help="default: the tokenizer config's")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes, each encodes a contiguous slice of the manifest")
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.vq.tokenize_images import tokenize_manifest
        from ernie_vilg.runtime import configure_threads, setup_logging

        setup_logging()
        configure_threads(args.threads)
        if args.workers > 1:
            from ernie_vilg.vq.parallel_tokenize import tokenize_manifest_parallel

            threads = max(1, args.threads // args.workers) if args.threads else 1
            summary = tokenize_manifest_parallel(
                args.ckpt, args.manifest, args.out, workers=args.workers, batch_size=args.batch_size,
                shard_size=args.shard_size, image_size=args.image_size, threads_per_worker=threads)
        else:
            summary = tokenize_manifest(args.ckpt, args.manifest, args.out, args.batch_size,
                                        args.shard_size, args.image_size)
        print(json.dumps(summary, ensure_ascii=False))
        return 0

    from ernie_vilg.config import ConfigError
    from ernie_vilg.data.manifest import ManifestError
    from ernie_vilg.checkpoint_io import CheckpointError

    return run_or_exit(run, (ConfigError, ManifestError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
