"""Build the WordPiece vocab of the text tokenizer from manifests:
`python tools/build_vocab.py --manifest M [M ...] --out vocab.txt`."""
import argparse
import sys

from ernie_vilg.cli.common import run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", nargs="+", required=True, help="JSONL manifests (text and texts fields)")
    parser.add_argument("--out", required=True, help="vocab.txt to write")
    parser.add_argument("--min-count", type=int, default=1, help="drop whole ASCII words seen fewer times")
    args = parser.parse_args()

    def run() -> int:
        from ernie_vilg.text.vocab import build_vocab

        tokens = build_vocab(args.manifest, args.out, args.min_count)
        print(f"wrote {args.out}: {len(tokens)} tokens")
        return 0

    from ernie_vilg.data.manifest import ManifestError

    return run_or_exit(run, (ManifestError,))


if __name__ == "__main__":
    sys.exit(main())
