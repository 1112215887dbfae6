"""The NaN / inf guard: a non-finite loss or gradient skips the step (counted, logged with the batch
id); K consecutive skips stop the job with a clear error, and nothing corrupt is saved."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_stage import ToyStage, toy_overrides  # noqa: E402

from ernie_vilg.config import load_config  # noqa: E402
from ernie_vilg.checkpoint_io import latest_checkpoint, load_model_state  # noqa: E402
from ernie_vilg.training.nan_guard import NanGuard, TrainingDiverged, state_is_finite  # noqa: E402
from ernie_vilg.training.trainer import Trainer  # noqa: E402


def _layer_with_grads(bad: bool = False) -> paddle.nn.Layer:
    layer = paddle.nn.Linear(3, 2)
    x = paddle.to_tensor(np.full((1, 3), np.inf if bad else 1.0, dtype="float32"))
    (layer(x) * 0 + layer(x)).sum().backward()
    return layer


def test_finite_step_is_not_skipped():
    guard = NanGuard(max_consecutive=3)
    assert guard.check(paddle.to_tensor(1.5), _layer_with_grads(), batch_id=0) is False
    assert (guard.skipped, guard.consecutive) == (0, 0)


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_skips_and_logs_the_batch_id(loss, caplog):
    guard = NanGuard(max_consecutive=3)
    with caplog.at_level(logging.WARNING, logger="ernie_vilg.training.nan_guard"):
        assert guard.check(loss, None, batch_id="step 7 / epoch 0 pos 28") is True
    assert guard.skipped == 1 and guard.consecutive == 1
    assert "batch step 7 / epoch 0 pos 28: non-finite loss, update skipped" in caplog.text


def test_non_finite_gradient_skips_and_names_the_parameter(caplog):
    guard = NanGuard(max_consecutive=3)
    layer = _layer_with_grads(bad=True)
    with caplog.at_level(logging.WARNING, logger="ernie_vilg.training.nan_guard"):
        assert guard.check(paddle.to_tensor(0.5), layer, batch_id=12) is True
    assert "batch 12: non-finite gradient of weight" in caplog.text
    # gradients as (name, tensor) pairs work too; None gradients (frozen parameters) are ignored
    grads = [("a", paddle.ones([2])), ("b", None), ("c", paddle.to_tensor([1.0, math.nan]))]
    assert guard.first_non_finite(1.0, grads) == "gradient of c"
    assert NanGuard(check_grads=False).first_non_finite(1.0, grads) is None


def test_k_consecutive_skips_stop_with_a_message_and_a_good_step_resets_the_count():
    guard = NanGuard(max_consecutive=3)
    guard.check(math.nan, None, batch_id=1)
    guard.check(math.nan, None, batch_id=2)
    assert guard.check(1.0, None, batch_id=3) is False and guard.consecutive == 0
    guard.check(math.nan, None, batch_id=4)
    guard.check(math.inf, None, batch_id=5)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .* \(batches 4, 5, 6; last: loss\); "
                                               r"stopped without saving"):
        guard.check(math.nan, None, batch_id=6)
    assert guard.skipped == 5


def test_ranks_agree_one_bad_rank_skips_everywhere():
    guard = NanGuard(max_consecutive=0)  # 0: count, never stop
    assert guard.check(1.0, None, batch_id=0, agree=lambda local: True) is True  # another rank was bad
    assert guard.recent[-1].what == "loss or gradient on another rank"
    for i in range(20):
        guard.check(math.nan, None, batch_id=i)
    assert guard.skipped == 21


def test_scaler_overflows_are_counted_but_do_not_stop_the_job():
    guard = NanGuard(max_consecutive=2)
    for i in range(5):  # a dynamic loss scale calibrating: overflow after overflow is normal
        guard.record(True, i, "scaler overflow", counts_towards_stop=False)
    assert guard.skipped == 5 and guard.consecutive == 0
    guard2 = NanGuard()
    guard2.set_state_dict({"skipped": 4, "consecutive": 1})
    assert guard2.state_dict() == {"skipped": 4, "consecutive": 1}


def test_state_is_finite():
    assert state_is_finite({"w": paddle.ones([2]), "step": paddle.to_tensor([3], dtype="int64")})
    assert not state_is_finite({"w": paddle.to_tensor([1.0, math.nan])})


# --------------------------------------------------------------------------------------------
# with the real Trainer: the exact lines proposed for Trainer._apply_update
# --------------------------------------------------------------------------------------------
class PoisonedStage(ToyStage):
    """The toy stage whose batches from step `bad_from` on contain a NaN (and a single NaN batch
    at step `single_bad`)."""

    bad_from = 6
    single_bad = 2

    def training_step(self, ctx: Any, batch: dict[str, Any]):
        step = ctx.step
        if step == self.single_bad or step >= self.bad_from:
            batch = {**batch, "x": np.where(np.arange(batch["x"].size).reshape(batch["x"].shape) == 0,
                                            np.nan, batch["x"]).astype("float32")}
        return super().training_step(ctx, batch)


def test_trainer_skips_bad_steps_and_stops_after_k_without_saving_anything_corrupt(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, toy_overrides(out, 20, 4) + ["Train.save_every=1", "Train.keep_last=20",
                                                         "Train.max_consecutive_skips=3"])
    initial = PoisonedStage(cfg).build_model().state_dict()  # the seeded initial weights
    trainer = Trainer(cfg, PoisonedStage(cfg))  # the real Trainer and its own update
    with pytest.raises(TrainingDiverged, match="batches 6, 7, 8"):
        trainer.fit()
    # which steps changed the weights: checkpoint step-k holds the weights after step k - 1
    weights = {0: initial, **{int(p.name[5:]): load_model_state(p) for p in (out / "checkpoints").glob("step-*")}}
    applied = [k for k in range(8) if any(not np.array_equal(weights[k][n].numpy(), weights[k + 1][n].numpy())
                                          for n in initial)]
    assert applied == [0, 1, 3, 4, 5]  # step 2 (one bad batch) skipped, training went on
    # the 4th skip raised inside _apply_update, before the Trainer counted it
    assert trainer.nan_guard.skipped == 4 and trainer.skipped_steps == 3
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and newest.name == "step-00000008"  # saves after the skips, no later
    state = load_model_state(newest)
    assert state_is_finite(state)
    # the skipped steps never touched the weights: the last checkpoint holds step 6's weights
    six = load_model_state(out / "checkpoints" / "step-00000006")
    assert all(np.array_equal(state[k].numpy(), six[k].numpy()) for k in state)
    assert not list((out / "checkpoints").glob("*.tmp-*"))
