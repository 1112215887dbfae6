"""One rank of a multi-process test: the Trainer on the toy stage (tests/toy_stage.py).

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_worker.py -o ... [--until N]

Writes each rank's final parameters to <output_dir>/params/rank-R.npz for the test to compare.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # toy_stage lives next to this file

from toy_stage import ToyStage  # noqa: E402

from ernie_vilg.config import load_config  # noqa: E402
from ernie_vilg.runtime import seed_everything, setup_logging  # noqa: E402
from ernie_vilg.training.trainer import Trainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--until", type=int, default=None)
    args = parser.parse_args()
    cfg = load_config(None, args.override)
    setup_logging()
    seed_everything(cfg.Global.seed)
    trainer = Trainer(cfg, ToyStage(cfg))
    trainer.fit(until_step=args.until)
    folder = Path(cfg.Global.output_dir) / "params"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"rank-{trainer.rank}.npz", **{k: v.numpy() for k, v in trainer.inner.state_dict().items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
