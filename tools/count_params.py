"""Parameter count of an ERNIE-ViLG config without allocating weights:
`python tools/count_params.py -c configs/vilg/ernie_vilg_10b.yaml [-o Model.key=value ...]`.

Sizes left at 0 in the config (text vocab, image grid / codebook) must be given with -o.
"""
import argparse
import json
import sys

from ernie_vilg.cli.common import add_config_args, load_config_or_exit, run_or_exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args()
    cfg = load_config_or_exit(args.config, args.override)

    def run() -> int:
        from ernie_vilg.models.transformer import size_report

        report = size_report(cfg.Model)
        print(f"{report['params']:,} parameters ({report['params'] / 1e9:.3f} B)")
        print(json.dumps(report))
        return 0

    return run_or_exit(run, (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
