"""Train any stage (usage and the list of stages: `python tools/train.py --help`)."""
from ernie_vilg.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
