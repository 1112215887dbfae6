"""Merge a sharded training checkpoint into one inference checkpoint folder.

    python tools/merge_checkpoint.py --ckpt runs/x/checkpoints/step-00002000 --out runs/x/merged
    python tools/merge_checkpoint.py --ckpt runs/x --out merged --with-optimizer   # also resumable in 1 process
    python tools/merge_checkpoint.py --ckpt runs/x --out merged --dtype float32    # fp16/bf16 weights -> fp32
"""
from __future__ import annotations

import argparse
import sys

from ernie_vilg.config import ConfigError
from ernie_vilg.checkpoint_io import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint folder, or a run folder (newest checkpoint)")
    parser.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    parser.add_argument("--with-optimizer", action="store_true", help="merge the optimizer shards too")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="cast floating-point weights")
    args = parser.parse_args(argv)
    from ernie_vilg.training.merge import merge_checkpoint

    try:
        out = merge_checkpoint(args.ckpt, args.out, args.with_optimizer, args.dtype)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
