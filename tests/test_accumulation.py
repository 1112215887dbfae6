"""Gradient accumulation: micro batches of one rank's batch equal one big batch; no_sync wiring."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_stage import ToyStage, toy_overrides  # noqa: E402

from ernie_vilg.config import ConfigError, load_config  # noqa: E402
from ernie_vilg.training.distributed import ParallelContext, Topology  # noqa: E402
from ernie_vilg.training.trainer import Trainer, split_batch  # noqa: E402


def run(out: Path, **kw) -> Trainer:
    cfg = load_config(None, toy_overrides(out, 5, 8, **kw))
    trainer = Trainer(cfg, ToyStage(cfg))
    trainer.fit()
    return trainer


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_accumulated_training_equals_one_big_batch(tmp_path, steps):
    big = run(tmp_path / "big")
    acc = run(tmp_path / f"acc{steps}", **{"Distributed.accumulate_steps": steps})
    losses = lambda t: [r["loss"] for r in t.history if r["split"] == "train"]  # noqa: E731
    # mean of equal-sized micro-batch means = the batch mean; only float32 summation order differs
    np.testing.assert_allclose(losses(acc), losses(big), rtol=1e-6)
    for key, value in big.inner.state_dict().items():
        np.testing.assert_allclose(acc.inner.state_dict()[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)


def test_split_batch_splits_batch_sized_items_and_repeats_the_rest():
    batch = {"x": np.arange(12).reshape(6, 2), "t": paddle.arange(6), "names": list("abcdef"),
             "nested": ({"y": np.zeros((6, 1))}, 7), "scale": 0.5}
    parts = split_batch(batch, 3)
    assert len(parts) == 3
    assert parts[1]["x"].tolist() == [[4, 5], [6, 7]] and parts[2]["t"].numpy().tolist() == [4, 5]
    assert parts[0]["names"] == ["a", "b"] and parts[2]["nested"][0]["y"].shape == (2, 1)
    assert parts[1]["nested"][1] == 7 and parts[1]["scale"] == 0.5
    with pytest.raises(ConfigError, match="cannot split a batch of 6 items into 4"):
        split_batch(batch, 4)


class DataParallelLike:
    def __init__(self) -> None:
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        yield


@pytest.mark.parametrize("dp, sharding, expected", [(2, 1, 3), (1, 2, 0), (2, 2, 0), (1, 1, 0)])
def test_no_sync_skips_the_reduce_on_all_but_the_last_micro_step(dp, sharding, expected):
    cfg = load_config(None, [f"Distributed.dp_degree={dp}", f"Distributed.sharding_degree={sharding}"])
    ctx = ParallelContext(cfg, Topology(dp * sharding, 0, dp, sharding, 1, "cpu"))
    model = DataParallelLike()
    for i in range(4):
        with ctx.no_sync(model, last_micro_step=i == 3):
            pass
    # pure data parallel reduces in backward: 3 of 4 micro steps skip it; sharding reduces at step()
    assert model.entered == expected
