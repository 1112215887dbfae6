"""Generative VQA with a trained checkpoint (`Global.stage: vqa`, docs/vqa.md):

    python tools/vqa.py --ckpt DIR --image P --question Q          # prints {"image", "question", "answer"}
    python tools/vqa.py --ckpt DIR --manifest M --out answers.jsonl # one answer per manifest line;
                                                                   # exact match when M has answers
    python tools/vqa.py --ckpt DIR --shards S --out answers.jsonl   # VQA token shards (no image encoding)
    python tools/vqa.py --build-vocab vocab.txt --manifest M [M ...]  # vocab over questions + answers

Decoding: the checkpoint's Generation.decode_strategy (greedy / beam), or --strategy.
"""
import argparse
import json
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="vqa checkpoint folder (or its run folder)")
    parser.add_argument("--image", help="image file (with --question)")
    parser.add_argument("--question", help="question text (with --image)")
    parser.add_argument("--manifest", nargs="+", help="VQA manifest(s) (JSONL: image, question[, text])")
    parser.add_argument("--shards", help="VQA token shard folder (tools/tokenize_images.py on a VQA manifest)")
    parser.add_argument("--out", help="answers JSONL (batch modes)")
    parser.add_argument("--build-vocab", metavar="VOCAB", help="write a vocab over the manifests' questions + answers")
    parser.add_argument("--strategy", choices=("greedy", "beam"), default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N questions (0 = all)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    args = parser.parse_args()
    if args.build_vocab:
        if not args.manifest:
            parser.error("--build-vocab needs --manifest")
    elif not args.ckpt:
        parser.error("--ckpt is required")
    elif args.image or args.question:
        if not (args.image and args.question):
            parser.error("--image and --question go together")
    elif args.manifest:
        if len(args.manifest) != 1:
            parser.error("batch mode takes one --manifest")
    elif not args.shards:
        parser.error("give --image + --question, --manifest or --shards")

    def run() -> int:
        from ernie_vilg.generation import vqa
        from ernie_vilg.runtime import configure_threads

        configure_threads(args.threads)
        if args.build_vocab:
            from ernie_vilg.text.vocab import build_vqa_vocab

            tokens = build_vqa_vocab(args.manifest, args.build_vocab)
            print(f"wrote {args.build_vocab}: {len(tokens)} tokens")
            return 0
        from ernie_vilg.pipeline import load_bundle

        bundle = load_bundle(args.ckpt, need_image_tokenizer=not args.shards)
        if args.image:
            answer = vqa.answer_image_questions(bundle, [args.image], [args.question], args.strategy)[0]
            print(json.dumps({"image": args.image, "question": args.question, "answer": answer},
                             ensure_ascii=False), flush=True)
            return 0
        if args.manifest:
            summary = vqa.answer_manifest(bundle, args.manifest[0], args.out, args.strategy, args.batch_size,
                                          args.limit)
        else:
            summary = vqa.answer_shards(bundle, args.shards, args.out, args.strategy, args.batch_size, args.limit)
        print(json.dumps(summary, ensure_ascii=False))
        return 0

    from ernie_vilg.config import ConfigError
    from ernie_vilg.data.images import ImageError
    from ernie_vilg.data.manifest import ManifestError
    from ernie_vilg.data.token_shards import TokenShardError
    from ernie_vilg.checkpoint_io import CheckpointError

    return run_or_exit(run, (ConfigError, CheckpointError, ImageError, ManifestError, TokenShardError,
                             FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
