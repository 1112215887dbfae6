"""Image-to-text with a trained ERNIE-ViLG checkpoint:
`python tools/caption.py --ckpt DIR --image PATH [PATH ...]` prints one JSON line per image,
{"image": ..., "caption": ...}. The decoding strategy defaults to the checkpoint's
Generation.decode_strategy (greedy / beam / sampling). `--cfg-scale S`: classifier-free guidance
against the null image (docs/guidance.md); it replaces the checkpoint's Generation.caption_cfg_scale
(1 = off).
"""
import argparse
import json
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="vilg checkpoint folder (or its run folder)")
    parser.add_argument("--image", nargs="+", required=True, help="image files")
    parser.add_argument("--strategy", choices=("greedy", "beam", "sampling"), default=None)
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="caption guidance scale (default: the checkpoint's Generation.caption_cfg_scale; 1 = off)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per decoding batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it appears for > 1 image)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.generation.pipelines import caption_images
        from ernie_vilg.pipeline import load_bundle
        from ernie_vilg.runtime import configure_threads

        configure_threads(args.threads)
        bundle = load_bundle(args.ckpt, need_image_tokenizer=True)
        if args.cfg_scale is not None:
            bundle.cfg.Generation.caption_cfg_scale = args.cfg_scale
        for path, caption in zip(args.image, caption_images(bundle, args.image, args.strategy, args.batch_size,
                                                           progress=len(args.image) > 1 and not args.no_progress)):
            print(json.dumps({"image": path, "caption": caption}, ensure_ascii=False), flush=True)
        return 0

    from ernie_vilg.config import ConfigError
    from ernie_vilg.data.images import ImageError
    from ernie_vilg.checkpoint_io import CheckpointError

    return run_or_exit(run, (ConfigError, CheckpointError, ImageError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
