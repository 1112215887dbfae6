"""Train any stage: `python tools/train.py -c configs/....yaml [-o Section.key=value ...]`.

The config's Global.stage picks the stage (vq: image tokenizer; vilg: the bidirectional model).
Launch on many devices with `python -m paddle.distributed.launch ... tools/train.py -c ...`.
"""
from ernie_vilg.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
