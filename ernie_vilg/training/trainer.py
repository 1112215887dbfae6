"""The one Trainer that every training stage uses (tokenizer, bidirectional model, fine-tuning).

It owns the loop, the optimizer and schedule, logging, validation cadence, checkpoints and
resume. The stage (a `TrainModule`) owns the model, data and losses. The `Distributed` config
section drives the rest without forking the loop:

    _wrap()              Fleet topology and per-stage wrapping (`distributed.py`), AMP decoration
    _forward_backward()  gradient accumulation (micro batches, `no_sync`), autocast, loss scaling
    _apply_update()      optimizer step; skipped steps (inf/nan) agreed on by all ranks
    save() / resume()    each rank its optimizer shard, per-rank data position and RNG

Optional stage hooks (`TrainModule` defaults do nothing): `tokens(batch)` (target tokens in a
micro batch) enables tokens/s and, with `flops_per_token()`, model FLOP/s; `best_metric` (the
name of a `validate` metric to maximise) makes every validation that improves on the best value
so far write the weights to OUTPUT/best (a checkpoint folder without optimizer state; the metric
and its value in meta.json; the best value survives resume); `extra_optimizers()` names networks
the Trainer optimises besides the model (built, stepped through `StepContext.step_extra`,
reduced over ranks, saved as `<name>.pdparams` / `<name>.pdopt` in every checkpoint, resumed).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import paddle
from tqdm import tqdm

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.training import amp
from ernie_vilg.checkpoint_io import (
    load_weights_into,
    OPTIMIZER_PREFIX,
    WEIGHTS_PREFIX,
    CheckpointError,
    begin_checkpoint,
    flatten_state,
    commit_checkpoint,
    latest_checkpoint,
    load_optimizer_state,
    optimizer_shard_name,
    rank_state_name,
    read_meta,
    recover_interrupted,
    save_checkpoint,
    save_file,
    state_bytes,
    write_partition,
    write_shard,
)
from ernie_vilg.training.checkpoint import (
    OutputLock, optimizer_state_from_structured, optimizer_state_to_structured, owned_state_filter,
)
from ernie_vilg.training.distributed import ParallelContext
from ernie_vilg.training.logging import MetricsLogger
from ernie_vilg.safe_pickle import safe_load
from ernie_vilg.training.module import ExtraOptimizer, StepContext, TrainModule
from ernie_vilg.training.nan_guard import NanGuard
from ernie_vilg.training.schedule import learning_rate

log = logging.getLogger(__name__)
BEST_DIR = "best"  # OUTPUT/best: the weights of the best validation (next to OUTPUT/checkpoints)


def build_optimizer(model: paddle.nn.Layer, cfg: Config) -> paddle.optimizer.Optimizer:
    """AdamW; weight decay only on tensors with >= 2 dims (no param groups: stage-1 sharding
    rejects them, so decay is selected with apply_decay_param_fun). Under AMP O2 the optimizer
    keeps float32 master weights (multi_precision)."""
    o = cfg.Optimizer
    if o.name != "adamw":
        raise ConfigError(f"Optimizer.name: unknown optimizer {o.name!r} (known: adamw)")
    params = [p for p in model.parameters() if not p.stop_gradient]
    decay = {p.name for p in params if len(p.shape) >= 2}
    clip = paddle.nn.ClipGradByGlobalNorm(o.grad_clip) if o.grad_clip > 0 else None
    return paddle.optimizer.AdamW(
        learning_rate=o.lr, beta1=o.beta1, beta2=o.beta2, epsilon=o.eps, parameters=params,
        weight_decay=o.weight_decay, apply_decay_param_fun=lambda name: name in decay,
        grad_clip=clip, multi_precision=amp.multi_precision(cfg.Distributed),
    )


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split a batch along its first axis into `parts` equal micro batches.

    Arrays / tensors / lists whose length is the batch size are split; everything else (scalars,
    strings, per-batch metadata) is repeated in every part."""
    if parts == 1:
        return [batch]
    size = _batch_len(batch)
    if size is None or size % parts:
        raise ConfigError(f"cannot split a batch of {size} items into {parts} micro batches "
                          "(Distributed.accumulate_steps must divide the batch)")
    step = size // parts

    def take(x: Any, i: int) -> Any:
        if isinstance(x, dict):
            return {k: take(v, i) for k, v in x.items()}
        if isinstance(x, (np.ndarray, paddle.Tensor)) and x.ndim > 0 and x.shape[0] == size:
            return x[i * step:(i + 1) * step]
        if isinstance(x, (list, tuple)) and len(x) == size:
            return type(x)(x[i * step:(i + 1) * step])
        if isinstance(x, tuple):
            return tuple(take(v, i) for v in x)
        return x

    return [take(batch, i) for i in range(parts)]


def _batch_len(x: Any) -> Optional[int]:
    if isinstance(x, (np.ndarray, paddle.Tensor)) and x.ndim > 0:
        return int(x.shape[0])
    if isinstance(x, dict):
        for v in x.values():
            n = _batch_len(v)
            if n is not None:
                return n
    if isinstance(x, (list, tuple)):
        if x and isinstance(x[0], (np.ndarray, paddle.Tensor, dict)):
            return _batch_len(x[0])
        return len(x)
    return None


def build_extra_optimizer(extra: ExtraOptimizer, cfg: Config) -> paddle.optimizer.Optimizer:
    """AdamW of a stage's extra network (Optimizer's betas / eps, the extra's own weight decay)."""
    o = cfg.Optimizer
    return paddle.optimizer.AdamW(learning_rate=o.lr * extra.lr_mult, parameters=extra.layer.parameters(),
                                  beta1=o.beta1, beta2=o.beta2, epsilon=o.eps, weight_decay=extra.weight_decay)


def extra_files(name: str) -> tuple[str, str]:
    """(weights, optimizer state) file names of an extra network inside a checkpoint folder."""
    return f"{name}.pdparams", f"{name}.pdopt"


WEIGHTS_ONLY_HINT = "set Train.resume_weights_only=true to continue from the weights alone"


def _load_pickle(path: Path, hint: str = "") -> Any:
    """A pickle of the run's own checkpoint through the allow-list, or one-line CheckpointError."""
    try:
        return safe_load(path)
    except Exception as exc:  # truncated pickles raise assorted types
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {str(exc)[:120]})"
                              + (f"; {hint}" if hint else "")) from None


def _load_state_file(path: Path) -> Any:
    """trainer_state.pd / rank_state.*.pd, or one-line CheckpointError (missing, truncated)."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: cannot resume: no {path.name}; {WEIGHTS_ONLY_HINT}")
    state = _load_pickle(path, WEIGHTS_ONLY_HINT)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a trainer state (no step)")
    return state


def _numpy_rng_state() -> list[Any]:
    # plain Python values: paddle.save would turn the uint32 key array into a tensor it cannot hold
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


class Trainer:
    def __init__(self, cfg: Config, module: TrainModule, rank: int = 0, world_size: int = 1,
                 parallel: Optional[ParallelContext] = None) -> None:
        self.cfg = cfg
        self.module = module
        self.parallel = parallel or ParallelContext.create(cfg)
        topo = self.parallel.topo
        # data rank = dp_rank * sharding_degree + sharding_rank: sharding ranks read different data
        self.rank = topo.rank if topo.distributed else rank
        self.world_size = topo.world_size if topo.distributed else world_size
        data_rank, data_world = (topo.data_rank, topo.data_world) if topo.distributed else (rank, world_size)
        self.out = Path(cfg.Global.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        # one run per output folder (rank 0 holds the lock for the job), taken before anything
        # is read or written there; then a dead writer's half-committed save is put back
        self.lock = OutputLock(self.out)
        if self.rank == 0:
            self.lock.acquire()
            recover_interrupted(self.ckpt_root)
            recover_interrupted(self.out)  # OUTPUT/best
        if topo.distributed:
            self.parallel.barrier()  # no rank looks for checkpoints before rank 0 recovered them
        self.step = 0
        self.skipped_steps = 0
        self.nan_guard = NanGuard(max_consecutive=cfg.Train.max_consecutive_skips)
        self.history: list[dict[str, Any]] = []
        self.log_window: list[dict[str, float]] = []
        self.best_metric: Optional[str] = module.best_metric or None
        self.best_value: Optional[float] = None
        self.metrics = MetricsLogger(self.out, enabled=self.rank == 0)
        self.model = module.build_model()
        self.inner = self.model  # the user's layer, never a wrapper (checkpoint keys, extras)
        self.optimizer = build_optimizer(self.model, cfg)
        # networks the stage trains with their own loss (GAN discriminator): built and owned here
        self.extras: dict[str, ExtraOptimizer] = dict(module.extra_optimizers())
        self.extra_optimizers = {name: build_extra_optimizer(x, cfg) for name, x in self.extras.items()}
        self.batches = module.train_batches(data_rank, data_world)
        self.scaler: Optional[Any] = None
        self.scaler_kind = "none"
        self.resumed_from: Optional[Path] = None
        # weights load before wrapping: stage 3 slices parameters when it wraps
        pending = latest_checkpoint(self.ckpt_root) if cfg.Train.resume else None
        if pending is not None:
            load_weights_into(self.inner, pending)
        self._wrap()
        if pending is not None:
            self._load_training_state(pending)

    # ---- seams for the distributed engine -------------------------------------------------
    def _wrap(self) -> None:
        """AMP decoration and the wrappers of the configured sharding stage (none in 1 process)."""
        wrapped = self.parallel.wrap(self.model, self.optimizer)
        self.model, self.optimizer = wrapped.model, wrapped.optimizer
        self.scaler, self.scaler_kind = wrapped.scaler, wrapped.scaler_kind

    def _forward_backward(self, batch: Any) -> dict[str, float]:
        """Forward + backward over `accumulate_steps` micro batches of this rank's batch.

        Each micro loss is divided by the number of micro batches, so the accumulated gradient is
        the gradient of the batch mean (equal to one big batch when the loss is a per-item mean).
        Data-parallel reduction happens once, on the last micro batch (`no_sync` before it)."""
        d = self.cfg.Distributed
        parts = split_batch(batch, d.accumulate_steps)
        totals: dict[str, float] = {}
        ctx = StepContext(model=self.inner, forward=self.model, step=self.step, rank=self.rank,
                          world_size=self.world_size, step_extra=self._step_extra)
        for i, part in enumerate(parts):
            with self.parallel.no_sync(self.model, last_micro_step=i == len(parts) - 1):
                with amp.autocast(d):
                    loss, logs = self.module.training_step(ctx, part)
                amp.backward(loss / len(parts) if len(parts) > 1 else loss, self.scaler)
            tokens = self.module.tokens(part)
            if tokens is not None:
                logs = {**logs, "tokens": float(tokens)}
            for key, value in {"loss": float(loss), **logs}.items():
                if isinstance(value, (int, float)):
                    # token counts add up over micro batches; everything else is averaged
                    share = value if key == "tokens" else value / len(parts)
                    totals[key] = totals.get(key, 0.0) + share
        return totals

    def _step_extra(self, name: str, loss: paddle.Tensor) -> None:
        """One whole update of the extra network `name` on `loss` (its replicas take the same
        step: gradients are averaged over the data-parallel ranks first)."""
        if name not in self.extra_optimizers:
            raise KeyError(f"stage {self.module.name!r} has no extra optimizer {name!r} "
                           f"(extra_optimizers: {', '.join(self.extra_optimizers) or 'none'})")
        opt, extra = self.extra_optimizers[name], self.extras[name]
        opt.clear_grad()
        loss.backward()
        if self.parallel.topo.distributed and self.world_size > 1:
            import paddle.distributed as dist

            for p in extra.layer.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.scale_(1.0 / self.world_size)
        opt.set_lr(learning_rate(self.step, self.cfg) * extra.lr_mult)
        opt.step()
        opt.clear_grad()

    def _save_extras(self, folder: Path) -> None:
        """The stage's extras, then every extra network's weights and optimizer state."""
        self.module.save_extras(self.inner, folder)
        for name, extra in self.extras.items():
            weights, opt = extra_files(name)
            paddle.save(extra.layer.state_dict(), str(Path(folder) / weights))
            # keyed by structured names: Paddle's auto names (conv2d_7.w_0) differ between processes
            state = optimizer_state_to_structured(self.extra_optimizers[name].state_dict(), extra.layer)
            paddle.save(state, str(Path(folder) / opt))

    def _load_extras(self, ckpt: Path, weights_only: bool) -> None:
        for name, extra in self.extras.items():
            weights, opt = extra_files(name)
            if not (ckpt / weights).is_file():
                if weights_only:
                    log.warning("%s has no %s: the %s starts fresh", ckpt, weights, name)
                    continue
                raise CheckpointError(f"{ckpt}: cannot resume: no {weights}; set Train.resume_weights_only=true "
                                      f"to continue with a fresh {name}")
            extra.layer.set_state_dict(_load_pickle(ckpt / weights))
            if (ckpt / opt).is_file() and not weights_only:
                state = _load_pickle(ckpt / opt)
                self.extra_optimizers[name].set_state_dict(optimizer_state_from_structured(state, extra.layer))

    def _apply_update(self, logs: dict[str, float]) -> bool:
        """Optimizer step unless the gradients are not finite; True if the step was skipped.

        With a loss scaler the (sharding-aware) scaler decides; without one, a non-finite loss on
        any rank skips the step on every rank (ranks that disagree would hang in collectives)."""
        if self.scaler is not None:
            skipped = self.nan_guard.record(amp.step(self.optimizer, self.scaler), self.step,
                                            counts_towards_stop=False)
        else:
            skipped = self.nan_guard.check(logs["loss"], self.inner, batch_id=self.step,
                                           agree=self.parallel.any_rank)
            if not skipped:
                self.optimizer.step()
        self.optimizer.clear_grad()
        return skipped

    # ---- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nan_guard": self.nan_guard.state_dict(),
            "data": self.batches.state_dict(),
            "rng_paddle": paddle.get_rng_state(),
            "rng_numpy": _numpy_rng_state(),
            # the open logging window: a run resumed mid-window logs the same mean as one never stopped
            "log_window": [{k: float(v) for k, v in w.items()} for w in self.log_window],
        }
        if self.scaler is not None and hasattr(self.scaler, "state_dict"):
            state["scaler"] = self.scaler.state_dict()
        if self.best_value is not None:
            state["best"] = {"metric": self.best_metric, "value": self.best_value}
        return state

    def _structured_optimizer_state(self) -> dict[str, Any]:
        return optimizer_state_to_structured(self.optimizer.state_dict(), self.inner)

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, optimizer states (moments), master weights."""
        opt = self.optimizer.state_dict()
        master = state_bytes(opt.get("master_weights", {}))
        return {"param_bytes": state_bytes(list(self.inner.parameters())),
                "optimizer_state_bytes": state_bytes(opt) - master,
                "master_weight_bytes": master, "rank": self.rank}

    def _meta(self) -> dict[str, Any]:
        topo, d = self.parallel.topo, self.cfg.Distributed
        return {"stage": self.module.name, "produced_by": "ernie_vilg.training.Trainer",
                "world_size": self.world_size, "dp_degree": topo.dp_degree,
                "sharding_degree": topo.sharding_degree, "sharding_stage": topo.sharding_stage,
                "optimizer_layout": "sliced" if topo.sharded and d.sharding_stage == 3 else "whole"}

    def save(self, name: Optional[str] = None) -> Path:
        """Write a checkpoint; under several processes every rank must call this (collective)."""
        topo = self.parallel.topo
        keep = self.cfg.Train.keep_last
        if not topo.distributed:
            path = save_checkpoint(
                self.ckpt_root, self.step, self.cfg, self.inner.state_dict(),
                self._structured_optimizer_state(), self.state(), self._meta(),
                extras=self._save_extras, keep_last=keep, name=name,
            )
            log.info("saved checkpoint %s", path)
            return path
        # every rank writes into rank 0's temporary folder; rank 0 commits after a barrier
        tag = self.parallel.broadcast_object(os.getpid())
        if self.rank == 0:
            begin_checkpoint(self.ckpt_root, self.step, name, tag)
        self.parallel.barrier()
        tmp, final = begin_checkpoint(self.ckpt_root, self.step, name, tag, create=False)
        sliced = topo.sharding_stage == 3 and topo.sharded
        # stage 3 gathers the full weights on every rank (GPU only; not bounded by a shard)
        model_state = self.parallel.full_model_state(self.model) if sliced else self.inner.state_dict()
        # each rank writes its part of the weights, one tensor at a time in host memory
        write_partition(tmp, WEIGHTS_PREFIX, model_state, self.rank, self.world_size)
        opt_state = self._structured_optimizer_state()
        if sliced:  # flat per-rank slices: one pickle per sharding rank (dp replicas hold identical ones)
            if topo.dp_rank == 0:
                save_file(opt_state, tmp, optimizer_shard_name(topo.sharding_rank, topo.sharding_degree))
        elif topo.sharded:  # stages 1 / 2: each sharding rank writes the states it owns
            if topo.dp_rank == 0:
                write_shard(tmp, OPTIMIZER_PREFIX, opt_state, topo.sharding_rank, topo.sharding_degree)
        else:  # dp: every rank holds the whole state and writes its part of the names
            write_partition(tmp, OPTIMIZER_PREFIX, opt_state, self.rank, self.world_size)
        save_file(self.state(), tmp, rank_state_name(self.rank))
        self.parallel.barrier()
        if self.rank == 0:
            commit_checkpoint(tmp, final, self.step, self.cfg, model_state, None, self.state(), self._meta(),
                              extras=self._save_extras, keep_last=keep, shards_written=True)
            log.info("saved checkpoint %s", final)
        self.parallel.barrier()
        return final

    def resume(self, ckpt: Optional[Path] = None) -> bool:
        """Continue from `ckpt` (default: the newest checkpoint). Weights are loaded into the
        wrapped model here; stage 3 needs them before wrapping, which __init__ does."""
        ckpt = ckpt or latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            return False
        if self.parallel.topo.sharding_stage == 3 and self.parallel.topo.sharded:
            raise CheckpointError(f"{ckpt}: under sharding stage 3 weights must load before wrapping; "
                                  "construct the Trainer with Train.resume=true instead of calling resume()")
        load_weights_into(self.inner, ckpt)
        self._load_training_state(ckpt)
        return True

    def _own_optimizer_states(self) -> Optional[Callable[[str], bool]]:
        """Under sharding stages 1 / 2, the states this rank's sharded optimizer owns (only those
        are read on resume); None (read all) elsewhere, or when the wrapper does not say."""
        topo = self.parallel.topo
        if not topo.sharded or self.cfg.Distributed.sharding_stage == 3:
            return None
        inner = getattr(self.optimizer, "_inner_opt", self.optimizer)
        rank2params = getattr(inner, "_rank2params", None)
        if not isinstance(rank2params, dict) or topo.sharding_rank not in rank2params:
            return None
        return owned_state_filter(self.inner, list(rank2params[topo.sharding_rank]))

    def _load_training_state(self, ckpt: Path) -> None:
        topo = self.parallel.topo
        weights_only = self.cfg.Train.resume_weights_only
        self._load_extras(ckpt, weights_only)
        keep = self._own_optimizer_states()
        opt_state = load_optimizer_state(ckpt, topo.sharding_rank, topo.sharding_degree, keep)
        if opt_state is not None:
            if keep is not None:
                log.info("optimizer states: read %d of this rank's (sharding rank %d of %d)",
                         len(flatten_state(opt_state)[0]), topo.sharding_rank, topo.sharding_degree)
            self.optimizer.set_state_dict(optimizer_state_from_structured(opt_state, self.inner))
        elif not weights_only:
            # a fresh AdamW state would silently break exact resume (different updates from here on)
            raise CheckpointError(f"{ckpt}: cannot resume: no optimizer state (optimizer-*.safetensors or "
                                  "optimizer.pdopt); set "
                                  "Train.resume_weights_only=true to continue from the weights with a fresh optimizer")
        try:
            state = _load_state_file(ckpt / "trainer_state.pd")
        except CheckpointError:
            if not weights_only:
                raise
            self.step = int(read_meta(ckpt).get("step", 0))
            self.resumed_from = ckpt
            log.warning("resumed the weights of %s at step %d with a fresh optimizer, data order and RNG "
                        "(Train.resume_weights_only)", ckpt, self.step)
            return
        own = ckpt / rank_state_name(self.rank)
        saved_world = int(read_meta(ckpt).get("world_size", 1))
        if topo.distributed and own.is_file() and saved_world == self.world_size:
            rank_state = _load_state_file(own)
        else:
            rank_state = state
            if saved_world != self.world_size:
                # the data split depends on the number of data ranks: the order cannot be replayed
                log.warning("%s was saved by %d process(es), now %d: continuing from rank 0's data "
                            "position, so the data order differs from an uninterrupted run",
                            ckpt, saved_world, self.world_size)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nan_guard.set_state_dict(state.get("nan_guard", {}))
        best = state.get("best")
        if best and best.get("metric") == self.best_metric:  # a changed metric starts a new best
            self.best_value = float(best["value"])
        self.batches.set_state_dict(rank_state["data"])
        if self.scaler is not None and "scaler" in state and hasattr(self.scaler, "load_state_dict"):
            self.scaler.load_state_dict(state["scaler"])
        paddle.set_rng_state(rank_state["rng_paddle"])
        kind, keys, pos, has_gauss, gauss = rank_state["rng_numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        self.log_window[:] = [dict(w) for w in state.get("log_window", [])]
        # steps after this checkpoint were logged by the run that died; they are trained again now
        self.metrics.drop_after(self.step)
        self.resumed_from = ckpt
        log.info("resumed from %s at step %d", ckpt, self.step)

    # ---- loop -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.metrics.write(record)

    def validate(self) -> dict[str, float]:
        self.model.eval()
        with paddle.no_grad():
            # the user's layer: validation decodes through model.cfg / prefill / step, which Fleet's
            # DataParallel / sharding wrappers do not forward (a dp 2 VQA run died at its first eval)
            metrics = self.module.validate(self.inner, self.step)
            media = self.module.validation_media(self.inner, self.step)
        self.model.train()
        if self.rank == 0:
            self.metrics.write_media(self.step, media)
        self._log({"step": self.step, "split": "val", **metrics})
        if self.rank == 0:
            tqdm.write(f"[val step {self.step}] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                             if isinstance(v, (int, float))))
        self._keep_best(metrics)
        return metrics

    def _keep_best(self, metrics: dict[str, float]) -> None:
        """Write OUTPUT/best when `metrics[best_metric]` beats the best value so far (every rank
        computes the same validation, so all ranks agree; under stage 3 gathering is collective)."""
        key = self.best_metric
        if not key or not isinstance(metrics.get(key), (int, float)) or not math.isfinite(metrics[key]):
            return
        value = float(metrics[key])
        if self.best_value is not None and value <= self.best_value:
            return
        self.best_value = value
        topo = self.parallel.topo
        sliced = topo.distributed and topo.sharding_stage == 3 and topo.sharded
        model_state = self.parallel.full_model_state(self.model) if sliced else self.inner.state_dict()
        if self.rank == 0:
            # weights, config and stage extras only: `--ckpt OUTPUT/best` loads it like any checkpoint
            path = save_checkpoint(self.out, self.step, self.cfg, model_state,
                                   meta={**self._meta(), "best_metric": key, "best_value": value},
                                   extras=lambda d: self.module.save_extras(self.inner, d), name=BEST_DIR)
            log.info("new best %s=%.4g at step %d: %s", key, value, self.step, path)
        if topo.distributed:
            self.parallel.barrier()

    def _write_memory_report(self) -> None:
        folder = self.out / "memory"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{self.rank:05d}.json").write_text(json.dumps(self.memory_report()), encoding="utf-8")

    def _window_record(self, window: list[dict[str, float]]) -> dict[str, Any]:
        keys = [k for k in window[-1] if k != "tokens"]
        mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in keys}
        seconds = sum(w["step_time"] for w in window)
        record: dict[str, Any] = {"step": self.step, "split": "train", **mean, "skipped_steps": self.skipped_steps}
        if all("tokens" in w for w in window) and seconds > 0:
            record["tokens_per_s"] = sum(w["tokens"] for w in window) / seconds
            flops = self.module.flops_per_token()
            if flops is not None:
                record["model_flops_per_s"] = record["tokens_per_s"] * float(flops)
        scale = amp.loss_scale(self.scaler)
        if scale is not None:
            record["loss_scale"] = scale
        return record

    def fit(self, until_step: Optional[int] = None) -> dict[str, Any]:
        """Train to Train.max_steps (or stop early at `until_step`, saving, as a job with a
        time limit would); a later Trainer (Train.resume) continues from the newest checkpoint,
        which it loads when it is constructed."""
        cfg = self.cfg.Train
        stop = min(until_step or cfg.max_steps, cfg.max_steps)
        self.model.train()
        start_time = time.time()
        iterator = iter(self.batches)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {self.module.name}",
                   disable=self.rank != 0 or not cfg.progress_bar, dynamic_ncols=True)
        window = self.log_window  # steps since the last train record (restored on resume)
        last_val: dict[str, float] = {}
        timed_out = False
        first_step = True
        while self.step < stop:
            lr = learning_rate(self.step, self.cfg)
            self.optimizer.set_lr(lr)
            t0 = time.time()
            logs = self._forward_backward(next(iterator))
            if self._apply_update(logs):
                self.skipped_steps += 1
            if first_step:
                self._write_memory_report()  # optimizer states exist after the first step
                first_step = False
            self.step += 1
            if self.parallel.topo.distributed:  # logs of the global batch, as one process would see
                logs = self.parallel.mean_over_ranks(logs)
                if "tokens" in logs:
                    logs["tokens"] *= self.world_size  # mean x ranks = tokens of the global batch
            logs["lr"] = lr
            logs["step_time"] = time.time() - t0
            window.append(logs)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                record = self._window_record(window)
                self._log(record)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "lr")})
                window.clear()
            if cfg.eval_every > 0 and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                last_val = self.validate()
            if cfg.max_minutes > 0 and self.parallel.any_rank((time.time() - start_time) / 60 >= cfg.max_minutes):
                log.warning("Train.max_minutes=%s reached at step %d: saving and stopping",
                            cfg.max_minutes, self.step)
                timed_out = True
                break
            if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save()
        bar.close()
        if self.parallel.topo.distributed:
            diff = self.parallel.replica_difference(self.model)
            self._log({"step": self.step, "split": "replicas", "max_difference": diff})
            if diff > 0:
                log.warning("ranks hold different weights after step %d (fingerprint difference %g)", self.step, diff)
        last_val = self.validate()
        final = self.save()
        self.metrics.close()
        self.lock.release()
        return {"step": self.step, "checkpoint": str(final), "val": last_val,
                "timed_out": timed_out, "seconds": time.time() - start_time}
