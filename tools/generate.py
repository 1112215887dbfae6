"""Text-to-image with a trained ERNIE-ViLG checkpoint or pretrained folder.

    python tools/generate.py --ckpt DIR --text "一个红色的圆形" [--text ...] --out OUT
    python tools/generate.py --ckpt DIR --prompts prompts.jsonl --batch-size 16 --out OUT
    python -m paddle.distributed.launch --nproc_per_node 2 tools/generate.py --ckpt DIR --prompts P --out OUT

Prompts: repeated --text (ids 00000, 00001, ... in order), or --prompts FILE: `.txt` one prompt a
line (id = its index, 00000 ...), `.jsonl` objects with `text` and optional `id` (the prompts.jsonl
of `eval_fid.py --sample-captions` and `human_eval.py prompts` as they are).

Writes into OUT:
    {id}.png        the image of a prompt when one image per prompt is kept
    {id}_{k}.png    with --num-candidates N > 1: k = candidate 0..N-1; with --keep K > 1: k = rank
                    (0 = best)
    {id}.txt        the prompt (written after its images: marks the id finished)
    samples.jsonl   one row per image: id, prompt, image, seed, candidate, rank, scores
    grid.png        with --text only: every kept image, one row per prompt

Each prompt's seed is derived from --seed and its id, and texts are padded to a fixed width, so a
rerun, another --batch-size or another split over ranks gives the same images. A rerun skips the
ids already finished (a killed run loses at most the batch in flight). Under
paddle.distributed.launch the prompts are split over the ranks and one samples.jsonl results.

Sampling: --temperature, --top-k, --top-p and --cfg-scale (classifier-free guidance,
docs/guidance.md; 1 = off) replace the checkpoint's Generation settings.

Decoder: an end-to-end checkpoint (stage vilg_e2e, paper sec. 3.1.3) turns the generated tokens
into pixels with its own reconstructor; --decoder tokenizer uses the image tokenizer's decoder
instead (the two-stage path; Table 7's "end-to-end G + two-stage R").

Best-of-N (paper sec. 4.2): --num-candidates N --keep K [--reranker DIR] [--rank-by
reranker|likelihood|both] samples N images per prompt, ranks them by the contrastive reranker
and/or the model's own caption likelihood, and keeps the best K (scores in samples.jsonl).

Image completion: --init-image P --keep-rows R keeps the first R token rows of P's image tokens
and generates the rest for each prompt (text-guided editing of the lower part of an image).

An `--out` folder that already holds other files needs `--overwrite` (files of the same name are
replaced); a folder of an earlier generate run (it has `.parts/`) is resumed without it.

Bad input (a prompt file, a checkpoint, a setting) prints one line and exits with code 2.
"""
import argparse
import sys

from ernie_vilg.cli.common import check_generate_args, run_or_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="vilg checkpoint folder, its run folder, or a pretrained folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="prompt (repeatable)")
    src.add_argument("--prompts", help="prompt file: .txt (one a line) or .jsonl (id, text)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward batch")
    parser.add_argument("--num-candidates", type=int, default=None,
                        help="images sampled per prompt (default: the checkpoint's Generation.num_candidates, "
                             "e.g. 60 in the 10B config; 1 if it has none)")
    parser.add_argument("--keep", type=int, default=0,
                        help="best-of-N: keep the best K of --num-candidates per prompt (0 = keep all, unranked)")
    parser.add_argument("--reranker", default="", help="reranker checkpoint folder (tools/train.py, stage reranker)")
    parser.add_argument("--rank-by", default="", choices=["", "reranker", "likelihood", "both"],
                        help="ranking signal (default: reranker if --reranker is given, else likelihood)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; a prompt's seed = hash(seed, id)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--top-k", type=int, default=None, help="0 = no top-k filter; default: the checkpoint's")
    parser.add_argument("--top-p", type=float, default=None, help="1 = no nucleus filter; default: the checkpoint's")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the checkpoint's Generation.cfg_scale; 1 = off)")
    parser.add_argument("--decoder", choices=("tokenizer", "e2e"), default=None,
                        help="tokens -> pixels: the image tokenizer, or an end-to-end checkpoint's reconstructor "
                             "(default: e2e for end-to-end checkpoints, else tokenizer)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out folder that holds files other than an earlier generate run's")
    parser.add_argument("--init-image", default=None, help="image completion: the image whose top rows are kept")
    parser.add_argument("--keep-rows", type=int, default=0, help="image completion: token rows of --init-image kept")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.init_image is None) != (args.keep_rows == 0):
        parser.exit(2, "error: --init-image and --keep-rows >= 1 go together\n")
    if args.num_candidates is None:
        from ernie_vilg.cli.common import checkpoint_num_candidates

        args.num_candidates = checkpoint_num_candidates(args.ckpt)
    check_generate_args(args)  # one line and exit 2 before the model loads

    def run() -> int:
        from ernie_vilg.generation.batch import BatchSettings, Prompt, generate_batch_to_folder, read_prompts
        from ernie_vilg.pipeline import load_bundle
        from ernie_vilg.runtime import configure_threads

        configure_threads(args.threads)
        if args.prompts:
            prompts = read_prompts(args.prompts)
        else:
            prompts = [Prompt(f"{i:05d}", t) for i, t in enumerate(args.text)]
        settings = BatchSettings(batch_size=args.batch_size, num_candidates=args.num_candidates, keep=args.keep,
                                 seed=args.seed, rank_by=args.rank_by, progress=not args.no_progress)
        bundle = load_bundle(args.ckpt, need_image_tokenizer=True)
        if args.decoder:
            if args.decoder == "e2e" and not hasattr(bundle.model, "reconstruct_from_ids"):
                raise ValueError(f"--decoder e2e: {bundle.ckpt_dir} is not an end-to-end checkpoint (stage vilg_e2e)")
            bundle.decoder = args.decoder
        counts = generate_batch_to_folder(
            bundle, prompts, args.out, settings, reranker=args.reranker or None,
            overrides={"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                       "cfg_scale": args.cfg_scale},
            init_image=args.init_image, keep_rows=args.keep_rows, grid=bool(args.text))
        print(f"{args.out}: {counts['generated']} prompts generated ({counts['images']} images), "
              f"{counts['skipped']} already done")
        return 0

    from ernie_vilg.config import ConfigError
    from ernie_vilg.checkpoint_io import CheckpointError

    return run_or_exit(run, (ConfigError, CheckpointError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
