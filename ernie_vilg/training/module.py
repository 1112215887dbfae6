"""The contract between the one Trainer and each training stage (`ernie_vilg/stages/`).

A stage is a `TrainModule`: it builds its model, its data and its losses. The Trainer owns the
loop, every optimizer (the model's and the stage's `extra_optimizers`, such as the GAN
discriminator's), schedules, logging, validation cadence, checkpoints and the Fleet wrapping.

Each step the Trainer hands the stage a `StepContext`:

- `ctx.model` is the stage's own layer (what `build_model` returned), never a distributed
  wrapper, so attributes such as `quantizer` or `get_last_layer()` are plain accesses;
- `ctx(*args)` runs the forward pass through the wrapper (DataParallel / sharding hook their
  gradient reduction into it), so every forward whose loss is returned must go through it;
- `ctx.step_extra(name, loss)` runs a whole update of one extra optimizer (backward, reduction over
  data-parallel ranks, learning rate = schedule x its multiplier, step, clear).

This module imports no stage: the registry of stages (`ernie_vilg.stages.STAGES`) sits above it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import paddle

from ernie_vilg.config import Config


class ResumableBatches(Protocol):
    """An endless iterator of batches whose position can be saved and restored exactly."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def set_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class ExtraOptimizer:
    """A second network a stage trains with its own loss (e.g. the GAN discriminator).

    The Trainer builds its AdamW from Optimizer (no weight decay), sets its learning rate to the
    schedule x `lr_mult` on every update, reduces its gradients over data-parallel ranks, and
    saves / resumes its weights and state in every checkpoint (`extra.<name>.pdparams / .pdopt`);
    they are not part of `model.pdparams`, which stays the stage's model alone."""

    layer: paddle.nn.Layer
    lr_mult: float = 1.0
    weight_decay: float = 0.0


@dataclass
class StepContext:
    """What a stage's `training_step` gets from the Trainer (see the module docstring)."""

    model: paddle.nn.Layer  # the stage's layer, never a wrapper
    forward: Callable[..., Any]  # the (possibly wrapped) model's __call__
    step: int
    rank: int = 0
    world_size: int = 1
    step_extra: Optional[Callable[[str, paddle.Tensor], None]] = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


class TrainModule:
    """Base class of every stage; subclasses implement the first five methods.

    Defaults: no best-checkpoint metric, no validation media, no extra optimizers, no token count
    (then tokens/s and model FLOP/s are not logged)."""

    name: str = ""  # Global.stage, e.g. "vq", "vilg"
    best_metric: str = ""  # a `validate` metric to maximise: the Trainer keeps OUTPUT/best by it

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg  # the resolved config (`StageSpec.resolve`); the Trainer saves it as is

    def build_model(self) -> paddle.nn.Layer:
        """Create the trainable model (weights initialised from cfg.Global.seed)."""
        raise NotImplementedError

    def train_batches(self, rank: int, world_size: int) -> ResumableBatches:
        """Training batches for this data-parallel rank."""
        raise NotImplementedError

    def training_step(self, ctx: StepContext, batch: Any) -> tuple[paddle.Tensor, dict[str, float]]:
        """Forward pass: (scalar loss to minimise, float logs such as per-direction losses)."""
        raise NotImplementedError

    def validate(self, model: paddle.nn.Layer, step: int) -> dict[str, float]:
        """Periodic validation metrics (model is in eval mode, no grad; the stage's own layer)."""
        return {}

    def save_extras(self, model: paddle.nn.Layer, ckpt_dir: Path) -> None:
        """Write what a `--ckpt DIR` loader needs besides weights + config (vocab, tokenizer ref)."""

    # ---- optional hooks with defaults --------------------------------------------------------
    def validation_media(self, model: paddle.nn.Layer, step: int) -> Any:
        """Images / texts shown beside validation (VisualDL), or None. Called on every rank right
        after `validate` (sharded weights stay collective); rank 0 logs it."""
        return None

    def extra_optimizers(self) -> dict[str, ExtraOptimizer]:
        """Networks the Trainer optimises besides the model (`StepContext.step_extra`)."""
        return {}

    def tokens(self, batch: Any) -> Optional[int]:
        """Target tokens in a (micro) batch, for tokens/s; None = not counted."""
        return None

    def flops_per_token(self) -> Optional[float]:
        """Training FLOPs per token (forward + backward), for model FLOP/s; None = not logged."""
        return None
