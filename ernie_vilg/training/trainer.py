"""The one Trainer that every training stage uses (tokenizer, bidirectional model, fine-tuning).

It owns the loop, the optimizer and schedule, logging, validation cadence, checkpoints and
resume. The stage (a `TrainModule`) owns the model, data and losses. Distributed wrapping,
AMP and accumulation hang off `_wrap` / `_forward_backward` so the engine issue can extend
them without forking the loop.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paddle
from tqdm import tqdm

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.training.checkpoint import (
    latest_checkpoint, load_model_state, optimizer_state_from_structured,
    optimizer_state_to_structured, save_checkpoint, set_model_state,
)
from ernie_vilg.training.module import TrainModule

log = logging.getLogger(__name__)


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


def build_optimizer(model: paddle.nn.Layer, cfg: Config) -> paddle.optimizer.Optimizer:
    """AdamW; weight decay only on tensors with >= 2 dims (no param groups: stage-1 sharding
    rejects them, so decay is selected with apply_decay_param_fun)."""
    o = cfg.Optimizer
    if o.name != "adamw":
        raise ConfigError(f"Optimizer.name: unknown optimizer {o.name!r} (known: adamw)")
    params = [p for p in model.parameters() if not p.stop_gradient]
    decay = {p.name for p in params if len(p.shape) >= 2}
    clip = paddle.nn.ClipGradByGlobalNorm(o.grad_clip) if o.grad_clip > 0 else None
    return paddle.optimizer.AdamW(
        learning_rate=o.lr, beta1=o.beta1, beta2=o.beta2, epsilon=o.eps, parameters=params,
        weight_decay=o.weight_decay, apply_decay_param_fun=lambda name: name in decay,
        grad_clip=clip,
    )


def _numpy_rng_state() -> list[Any]:
    # plain Python values: paddle.save would turn the uint32 key array into a tensor it cannot hold
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


class Trainer:
    def __init__(self, cfg: Config, module: TrainModule, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.module = module
        self.rank = rank
        self.world_size = world_size
        self.out = Path(cfg.Global.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.step = 0
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []
        self.model = module.build_model()
        self.optimizer = build_optimizer(self.model, cfg)
        self.batches = module.train_batches(rank, world_size)
        self._wrap()

    # ---- seams for the distributed engine -------------------------------------------------
    def _wrap(self) -> None:
        """Single process: nothing to wrap (Fleet wrapping plugs in here)."""

    def _forward_backward(self, batch: Any) -> dict[str, float]:
        loss, logs = self.module.training_step(self.model, batch, self.step)
        loss.backward()
        return {"loss": float(loss), **logs}

    # ---- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "data": self.batches.state_dict(),
            "rng_paddle": paddle.get_rng_state(),
            "rng_numpy": _numpy_rng_state(),
        }

    def save(self, name: Optional[str] = None) -> Path:
        if self.rank != 0:
            return self.ckpt_root
        meta = {"stage": self.module.name, "produced_by": "ernie_vilg.training.Trainer",
                "world_size": self.world_size}
        path = save_checkpoint(
            self.ckpt_root, self.step, self.cfg, self.model.state_dict(),
            optimizer_state_to_structured(self.optimizer.state_dict(), self.model),
            self.state(), meta, extras=lambda d: self.module.save_extras(self.model, d),
            keep_last=self.cfg.Train.keep_last, name=name,
        )
        log.info("saved checkpoint %s", path)
        return path

    def resume(self, ckpt: Optional[Path] = None) -> bool:
        ckpt = ckpt or latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            return False
        set_model_state(self.model, load_model_state(ckpt), ckpt)
        if (ckpt / "optimizer.pdopt").is_file():
            opt_state = paddle.load(str(ckpt / "optimizer.pdopt"))
            self.optimizer.set_state_dict(optimizer_state_from_structured(opt_state, self.model))
        state = paddle.load(str(ckpt / "trainer_state.pd"))
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.batches.set_state_dict(state["data"])
        paddle.set_rng_state(state["rng_paddle"])
        kind, keys, pos, has_gauss, gauss = state["rng_numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    # ---- loop -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / "log.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def validate(self) -> dict[str, float]:
        self.model.eval()
        with paddle.no_grad():
            metrics = self.module.validate(self.model, self.step)
        self.model.train()
        self._log({"step": self.step, "split": "val", **metrics})
        if self.rank == 0:
            tqdm.write(f"[val step {self.step}] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                             if isinstance(v, (int, float))))
        return metrics

    def fit(self, until_step: Optional[int] = None) -> dict[str, Any]:
        """Train to Train.max_steps (or stop early at `until_step`, saving, as a job with a
        time limit would); a later fit() resumes from the newest checkpoint."""
        cfg = self.cfg.Train
        stop = min(until_step or cfg.max_steps, cfg.max_steps)
        if cfg.resume:
            self.resume()
        self.model.train()
        start_time = time.time()
        iterator = iter(self.batches)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {self.module.name}",
                   disable=self.rank != 0 or not cfg.progress_bar, dynamic_ncols=True)
        window: list[dict[str, float]] = []
        last_val: dict[str, float] = {}
        timed_out = False
        while self.step < stop:
            lr = learning_rate(self.step, self.cfg)
            self.optimizer.set_lr(lr)
            t0 = time.time()
            logs = self._forward_backward(next(iterator))
            if not math.isfinite(logs["loss"]):
                # non-finite loss: skip the update rather than poison the weights
                self.optimizer.clear_grad()
                self.skipped_steps += 1
                log.warning("step %d: non-finite loss %s, update skipped", self.step, logs["loss"])
            else:
                self.optimizer.step()
                self.optimizer.clear_grad()
            self.step += 1
            logs["lr"] = lr
            logs["step_time"] = time.time() - t0
            window.append(logs)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
                self._log({"step": self.step, "split": "train", **mean,
                           "skipped_steps": self.skipped_steps})
                bar.set_postfix({k: f"{v:.4g}" for k, v in mean.items() if k in ("loss", "lr")})
                window = []
            if cfg.eval_every > 0 and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                last_val = self.validate()
            if cfg.max_minutes > 0 and (time.time() - start_time) / 60 >= cfg.max_minutes:
                log.warning("Train.max_minutes=%s reached at step %d: saving and stopping",
                            cfg.max_minutes, self.step)
                timed_out = True
                break
            if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save()
        bar.close()
        last_val = self.validate()
        final = self.save()
        return {"step": self.step, "checkpoint": str(final), "val": last_val,
                "timed_out": timed_out, "seconds": time.time() - start_time}
