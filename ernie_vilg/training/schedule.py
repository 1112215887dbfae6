"""The learning-rate schedule every optimizer of a run follows (Optimizer.schedule)."""
from __future__ import annotations

import math

from ernie_vilg.config import Config, ConfigError


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warmup, then constant or cosine decay to min_lr at Train.max_steps."""
    o = cfg.Optimizer
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        span = max(1, cfg.Train.max_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"Optimizer.schedule: unknown schedule {o.schedule!r} (known: constant, cosine)")
