"""Export a checkpoint for Paddle Inference: `python tools/export.py --ckpt DIR --out D [--batch-size N]`.

Writes static graphs (the VQ decoder; for a vilg checkpoint the text-to-image and image-to-text
logits, i.e. one uncached decoding step) and D/export.json; see ernie_vilg/convert/export.py.
A bad checkpoint prints one line naming it and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (or a run folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the transformer graphs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*ccache.*")  # import-time notice; errors stay one line

    from ernie_vilg.config import ConfigError
    from ernie_vilg.convert.export import ExportError, export_checkpoint
    from ernie_vilg.checkpoint_io import CheckpointError

    try:
        info = export_checkpoint(args.ckpt, args.out, args.batch_size)
    except (ExportError, CheckpointError, ConfigError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "graphs": [g["name"] for g in info["graphs"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
