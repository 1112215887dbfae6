"""The contract between the one Trainer and each training stage (tokenizer, bidirectional model, ...).

A stage is a `TrainModule`: it builds its model, its data and its losses; the Trainer owns the
loop, the optimizer, schedules, logging, validation cadence, checkpoints and (later) the Fleet
wrapping. Stages never see the optimizer or the distributed wrappers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol

import paddle

from ernie_vilg.config import Config


class ResumableBatches(Protocol):
    """An endless iterator of batches whose position can be saved and restored exactly."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def set_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainModule(Protocol):
    name: str  # e.g. "vq", "vilg"
    # Optional, duck-typed (not members, so stages without them still match):
    # - `best_metric`, the name of a `validate` metric to maximise; the Trainer then keeps the best
    #   weights in OUTPUT/best;
    # - `validation_media(model, step) -> ValidationMedia | None`, called on every rank right after
    #   `validate` (model in eval mode, no grad; every rank runs it, as validation, so sharded
    #   weights stay collective); rank 0 logs it.

    def build_model(self) -> paddle.nn.Layer:
        """Create the trainable model (weights initialised from cfg.Global.seed)."""

    def train_batches(self, rank: int, world_size: int) -> ResumableBatches:
        """Training batches for this data-parallel rank."""

    def training_step(self, model: paddle.nn.Layer, batch: Any, step: int) -> tuple[paddle.Tensor, dict[str, float]]:
        """Forward pass: (scalar loss to minimise, float logs such as per-direction losses)."""

    def validate(self, model: paddle.nn.Layer, step: int) -> dict[str, float]:
        """Periodic validation metrics (model is in eval mode, no grad). `model` is the layer
        `build_model` returned, never a distributed wrapper, so generation helpers can use it."""

    def save_extras(self, model: paddle.nn.Layer, ckpt_dir: Path) -> None:
        """Write what a `--ckpt DIR` loader needs besides weights + config (vocab, tokenizer ref)."""


def module_for(cfg: Config) -> TrainModule:
    """Registry: Global.stage -> TrainModule."""
    stage = cfg.Global.stage
    if stage == "vq":
        from ernie_vilg.vq.module import VQTrainModule

        return VQTrainModule(cfg)
    if stage == "vilg":
        from ernie_vilg.models.module import VilgTrainModule

        return VilgTrainModule(cfg)
    if stage == "reranker":
        from ernie_vilg.models.reranker_module import RerankerTrainModule

        return RerankerTrainModule(cfg)
    if stage == "vqgan":
        from ernie_vilg.vq.gan_module import VQGANTrainModule

        return VQGANTrainModule(cfg)
    if stage == "dvae":
        from ernie_vilg.vq.dvae_module import DVAETrainModule

        return DVAETrainModule(cfg)
    if stage == "vqa":
        from ernie_vilg.models.vqa_module import VqaTrainModule

        return VqaTrainModule(cfg)
    if stage == "caption_finetune":
        from ernie_vilg.models.finetune_module import CaptionFinetuneModule

        return CaptionFinetuneModule(cfg)
    if stage == "vilg_e2e":
        from ernie_vilg.models.e2e_module import E2ETrainModule

        return E2ETrainModule(cfg)
    from ernie_vilg.config import ConfigError

    raise ConfigError(f"Global.stage: unknown stage {stage!r} "
                      "(known: vq, vqgan, dvae, vilg, vilg_e2e, vqa, caption_finetune, reranker)")
