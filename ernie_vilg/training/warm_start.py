"""Warm starts: a new run's model initialised from another stage's checkpoint (weights only; the
optimizer starts fresh).

- `load_weights` (caption fine-tuning from a vilg checkpoint): every weight, strictly;
- `init_by_token` (VQA from a vilg checkpoint): every weight of the same shape; the text embedding
  and head rows matched by token (the VQA vocab has question words a caption vocab lacks), the text
  position table by its first rows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import paddle

from ernie_vilg.checkpoint_io import (
    load_weights_into,
    CheckpointError,
    load_checkpoint_config,
    load_model_state,
    optional_state_keys,
    )
from ernie_vilg.config import ConfigError

log = logging.getLogger(__name__)


def load_weights(model: paddle.nn.Layer, ckpt: str | Path, where: str) -> Path:
    """Load a checkpoint's weights strictly into `model`; ConfigError naming `where` (the config
    key that points at it) when the checkpoint does not fit. Returns the checkpoint folder."""
    try:
        ckpt_dir, _ = load_checkpoint_config(ckpt)
        load_weights_into(model, ckpt_dir)
    except CheckpointError as exc:
        raise ConfigError(f"{where}={ckpt}: {exc}") from None
    return ckpt_dir


def init_by_token(model: paddle.nn.Layer, ckpt: str | Path, vocab: Sequence[str], where: str = "VQA.init_from"
                  ) -> dict[str, int]:
    """Copy a vilg checkpoint's weights into `model`, whose text vocab is `vocab`; returns counts."""
    ckpt_dir, _ = load_checkpoint_config(ckpt)
    src_vocab_file = ckpt_dir / "vocab.txt"
    if not src_vocab_file.is_file():
        raise ConfigError(f"{where}={ckpt}: no vocab.txt in {ckpt_dir} (not a vilg checkpoint?)")
    src_index = {t: i for i, t in enumerate(src_vocab_file.read_text(encoding="utf-8").splitlines())}
    rows = [(i, src_index[t]) for i, t in enumerate(vocab) if t in src_index]
    dst_rows, src_rows = (np.asarray(x, dtype=np.int64) for x in zip(*rows)) if rows else (np.zeros(0, np.int64),) * 2
    state = load_model_state(ckpt_dir)
    own = model.state_dict()
    new_state, counts = {}, {"copied": 0, "vocab_rows": len(rows), "partial": 0}
    optional = optional_state_keys(model)
    for key, target in own.items():
        if key not in state and key in optional:  # an older checkpoint: keeps its initial value
            log.warning("%s=%s: no %s in the checkpoint, keeping its initial value", where, ckpt, key)
            continue
        if key not in state:
            raise ConfigError(f"{where}={ckpt}: the checkpoint has no {key} (not a vilg checkpoint?)")
        src = np.asarray(state[key].numpy() if hasattr(state[key], "numpy") else state[key])
        dst = target.numpy()
        if key.startswith(("tok_emb_txt.", "head_txt.")) and src.shape[1:] == dst.shape[1:]:
            dst[dst_rows] = src[src_rows]  # [V, d] or [V]: rows matched by token, new tokens keep their init
            new_state[key] = dst
            counts["partial"] += 1
        elif list(src.shape) == list(dst.shape):
            new_state[key] = src
            counts["copied"] += 1
        elif key.startswith("pos_emb_txt.") and src.shape[1:] == dst.shape[1:]:
            k = min(src.shape[0], dst.shape[0])
            dst[:k] = src[:k]
            new_state[key] = dst
            counts["partial"] += 1
        else:
            raise ConfigError(f"{where}={ckpt}: {key} has shape {list(src.shape)} there, "
                              f"{list(dst.shape)} here (a different Model config?)")
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in new_state.items()})
    return counts
