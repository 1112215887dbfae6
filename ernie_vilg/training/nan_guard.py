"""The NaN / inf guard of the training loop.

One non-finite loss or gradient (a bad batch, an fp16 overflow that slipped through, a spike)
must not poison the weights: the step is skipped, counted and logged with the batch id. A run
that keeps producing non-finite values has diverged; after `max_consecutive` skips in a row the
guard raises `TrainingDiverged`, which the trainer lets propagate *before* any save, so the newest
checkpoint on disk stays the last good state (a skipped step never touches the weights, and
`state_is_finite` lets a save refuse weights that are not finite anyway).

Under several processes every rank must take the same decision (a rank that steps while another
skips would hang in the next collective): pass `agree=parallel.any_rank`, so one bad rank makes
every rank skip.

With a dynamic loss scaler (fp16) overflowing *scaled* gradients are the scaler's business (it
skips the step and lowers the scale, which is normal during its first steps); the trainer then
reports the scaler's decision with `record(...)`, and only a non-finite *loss* counts towards
`max_consecutive` (see `record`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import paddle

log = logging.getLogger(__name__)

BatchId = Union[int, str]


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: the job stops (tools exit with code 2)."""


@dataclass
class BadStep:
    batch_id: BatchId
    what: str  # "loss" | "gradient of <param name>" | "scaler overflow"


@dataclass
class NanGuard:
    """Decides per step whether to skip; counts skips; stops after `max_consecutive` in a row.

    max_consecutive: K; 0 disables the stop rule (skips are still counted).
    check_grads: also scan the gradients (one fused reduction over all parameters per step).
    """

    max_consecutive: int = 5
    check_grads: bool = True
    skipped: int = 0  # skipped steps over the whole run (restored on resume)
    consecutive: int = 0  # skipped steps in a row right now
    recent: list[BadStep] = field(default_factory=list)  # the last few bad steps, newest last

    # ---------------------------------------------------------------- the per-step decision
    def check(self, loss: Any, grads: Any = None, batch_id: BatchId = "?",
              agree: Optional[Callable[[bool], bool]] = None) -> bool:
        """True if this step must be skipped (non-finite loss or gradient here or on any rank).

        loss: a float or a scalar Tensor. grads: an `nn.Layer` (its parameters' `.grad`), an
        iterable of Tensors / (name, Tensor) pairs, or None. agree: maps this rank's verdict to
        the verdict of all ranks (e.g. `ParallelContext.any_rank`); None in one process.
        Raises `TrainingDiverged` when this skip is the `max_consecutive`-th in a row.
        """
        what = self.first_non_finite(loss, grads)
        bad = what is not None
        if agree is not None:
            bad = bool(agree(bad))
            if bad and what is None:
                what = "loss or gradient on another rank"
        return self.record(bad, batch_id, what or "")

    def record(self, skipped: bool, batch_id: BatchId, what: str = "scaler overflow",
               counts_towards_stop: bool = True) -> bool:
        """Count a step whose skip was decided elsewhere (e.g. by a loss scaler); returns `skipped`.

        A scaler overflow is normal while the scale calibrates: pass counts_towards_stop=False
        for it, so only non-finite losses move the stop rule."""
        if not skipped:
            self.consecutive = 0
            return False
        self.skipped += 1
        if counts_towards_stop:
            self.consecutive += 1
        self.recent = (self.recent + [BadStep(batch_id, what)])[-8:]
        log.warning("batch %s: non-finite %s, update skipped (%d skipped in total, %d in a row)",
                    batch_id, what, self.skipped, self.consecutive)
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            ids = ", ".join(str(b.batch_id) for b in self.recent[-self.consecutive:])
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive steps with a non-finite loss or "
                f"gradient (batches {ids}; last: {what}); stopped without saving, the newest "
                f"checkpoint is the last good state (lower Optimizer.lr, check the data, or raise "
                f"the limit of consecutive skips)")
        return True

    # ---------------------------------------------------------------- finiteness tests
    def first_non_finite(self, loss: Any, grads: Any = None) -> Optional[str]:
        """"loss", "gradient of <name>" or None if everything is finite."""
        if not _is_finite_scalar(loss):
            return "loss"
        if not self.check_grads or grads is None:
            return None
        named = list(_named_grads(grads))
        if not named:
            return None
        # one reduction and one device->host sync for all parameters, not one per tensor
        flags = paddle.stack([paddle.isfinite(g).all() for _, g in named])
        if bool(flags.all()):
            return None
        bad = [name for (name, _), ok in zip(named, flags.numpy().tolist()) if not ok]
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        return f"gradient of {bad[0]}{more}"

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def set_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def _is_finite_scalar(value: Any) -> bool:
    if isinstance(value, paddle.Tensor):
        return bool(paddle.isfinite(value.astype("float32")).all())
    return math.isfinite(float(value))


def _named_grads(grads: Any) -> Iterable[tuple[str, paddle.Tensor]]:
    if isinstance(grads, paddle.nn.Layer):
        for name, p in grads.named_parameters():
            if p.grad is not None:
                yield name, p.grad
        return
    for i, item in enumerate(grads):
        name, g = item if isinstance(item, tuple) else (f"#{i}", item)
        if g is not None:
            yield name, g


def state_is_finite(state: dict[str, Any]) -> bool:
    """True if every floating tensor of a (flat) state dict is finite: a save can refuse
    weights that are not, so a checkpoint on disk is never NaN-poisoned."""
    for value in state.values():
        if isinstance(value, paddle.Tensor) and value.dtype in (paddle.float16, paddle.bfloat16,
                                                                paddle.float32, paddle.float64):
            if not bool(paddle.isfinite(value.astype("float32")).all()):
                return False
    return True
