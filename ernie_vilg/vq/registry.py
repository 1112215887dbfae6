"""The tokenizer registry: `VQ.kind` -> class, and `load_tokenizer` for trained checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ernie_vilg.checkpoint_io import load_checkpoint_config, load_weights_into
from ernie_vilg.config import ConfigError, VQConfig
from ernie_vilg.vq.base import ImageTokenizer
from ernie_vilg.vq.dvae import build_dvae
from ernie_vilg.vq.vqgan import build_vqgan
from ernie_vilg.vq.vqvae import VQVAE

# VQ.kind -> constructor
TOKENIZERS: dict[str, Callable[[VQConfig], ImageTokenizer]] = {
    "vqvae": VQVAE,
    "vqgan": build_vqgan,
    "vqgan_gumbel": build_vqgan,
    "dvae": build_dvae,
}


def build_tokenizer(vq_cfg: VQConfig) -> ImageTokenizer:
    """A new (untrained) tokenizer of kind `vq_cfg.kind`."""
    try:
        builder = TOKENIZERS[vq_cfg.kind]
    except KeyError:
        raise ConfigError(f"VQ.kind: unknown tokenizer {vq_cfg.kind!r} (known: {', '.join(TOKENIZERS)})") from None
    return builder(vq_cfg)


def load_tokenizer(ckpt_dir: str | Path) -> ImageTokenizer:
    """Rebuild a trained tokenizer from a Trainer checkpoint folder (or its run folder) and freeze it.

    Reads `config.yaml` (the resolved config) and `model.pdparams` (strictly: a missing or
    mis-shaped key raises CheckpointError naming it).
    """
    ckpt, cfg = load_checkpoint_config(ckpt_dir)
    tokenizer = build_tokenizer(cfg.VQ)
    load_weights_into(tokenizer, ckpt)
    return tokenizer.freeze()
