"""Train any stage: python tools/train.py -c CONFIG.yaml [-o Section.key=value ...]

The config's Global.stage picks what is trained:

    vq                image tokenizer, VQVAE (configs/vq/shapes_vqvae.yaml, vqvae_f8_8192.yaml)
    vqgan             image tokenizer, VQGAN (configs/vq/shapes_vqgan.yaml, vqgan_f8_8192.yaml)
    dvae              image tokenizer, DALL-E dVAE (configs/vq/shapes_dvae.yaml, dvae_8192.yaml)
    vilg              the bidirectional text<->image model (configs/vilg/shapes.yaml, ernie_vilg_10b.yaml)
    vilg_e2e          generator + reconstructor trained end to end (configs/vilg/shapes_e2e.yaml)
    reranker          contrastive image-text reranker for best-of-N (configs/reranker/shapes.yaml)
    caption_finetune  caption fine-tuning (configs/finetune/aic_icc.yaml, coco_cn.yaml, ...)
    vqa               generative VQA fine-tuning (configs/finetune/fmiqa.yaml, shapes_vqa.yaml)

Examples:
    python tools/train.py -c configs/vq/shapes_vqvae.yaml -o Global.output_dir=runs/vq
    python tools/train.py -c configs/vilg/shapes.yaml -o Data.tokenizer_ckpt=runs/vq -o Train.max_steps=100
    python -m paddle.distributed.launch --nproc_per_node 8 tools/train.py -c configs/vilg/lite_300m.yaml \
        -o Distributed.sharding_degree=8

A run resumes from its newest checkpoint in Global.output_dir. Bad config values exit with code 2
and one line naming the key (docs/distributed.md: operator guide).
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

from ernie_vilg.cli.common import add_config_args, load_config_or_exit, run_or_exit
from ernie_vilg.config import ConfigError


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(args.config, args.override)

    def run() -> int:
        from ernie_vilg.runtime import configure_threads, seed_everything, setup_logging
        from ernie_vilg.stages import prepare
        from ernie_vilg.training.trainer import Trainer

        setup_logging()
        configure_threads(cfg.Global.num_threads)
        seed_everything(cfg.Global.seed)
        module = prepare(cfg)  # topology checked, then the config resolved, then the stage built
        trainer = Trainer(module.cfg, module)
        result = trainer.fit()
        print(json.dumps(result, ensure_ascii=False, default=str))
        return 0

    from ernie_vilg.data.images import ImageError
    from ernie_vilg.data.manifest import ManifestError
    from ernie_vilg.data.token_shards import TokenShardError
    from ernie_vilg.checkpoint_io import CheckpointError
    from ernie_vilg.training.nan_guard import TrainingDiverged

    return run_or_exit(run, (ConfigError, ManifestError, ImageError, TokenShardError, CheckpointError,
                             TrainingDiverged))
