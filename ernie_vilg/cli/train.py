"""`tools/train.py`: every training stage, picked by Global.stage."""
from __future__ import annotations

import argparse
import json
from typing import Optional

from ernie_vilg.cli.common import add_config_args, load_config_or_exit, run_or_exit
from ernie_vilg.config import ConfigError


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(args.config, args.override)

    def run() -> int:
        from ernie_vilg.runtime import configure_threads, seed_everything, setup_logging
        from ernie_vilg.training.module import module_for
        from ernie_vilg.training.trainer import Trainer

        setup_logging()
        configure_threads(cfg.Global.num_threads)
        seed_everything(cfg.Global.seed)
        trainer = Trainer(cfg, module_for(cfg))
        result = trainer.fit()
        print(json.dumps(result, ensure_ascii=False, default=str))
        return 0

    from ernie_vilg.data.images import ImageError
    from ernie_vilg.data.manifest import ManifestError
    from ernie_vilg.data.token_shards import TokenShardError
    from ernie_vilg.training.checkpoint import CheckpointError
    from ernie_vilg.training.nan_guard import TrainingDiverged

    return run_or_exit(run, (ConfigError, ManifestError, ImageError, TokenShardError, CheckpointError,
                             TrainingDiverged))
