"""A small stand-in training stage for the distributed engine's tests.

Data rank r of W sees rows [r*B, (r+1)*B) of a global batch drawn per step, so W processes with
batch B see exactly the rows one process with batch W*B sees (the "same global batch").
Four equal Linear layers keep Fleet's greedy size-based parameter partition balanced.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import paddle

from ernie_vilg.training.module import StepContext, TrainModule

WIDTH = 16


class GlobalSliceBatches:
    def __init__(self, seed: int, batch: int, rank: int, world: int) -> None:
        self.seed, self.batch, self.rank, self.world, self.pos = seed, batch, rank, world, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            rng = np.random.default_rng([self.seed, self.pos])
            x = rng.normal(size=(self.batch * self.world, WIDTH)).astype("float32")
            y = np.sin(x.sum(axis=1, keepdims=True)).astype("float32")
            self.pos += 1
            rows = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
            yield {"x": x[rows], "y": y[rows]}

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def set_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])


class ToyNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.layers = paddle.nn.LayerList([paddle.nn.Linear(WIDTH, WIDTH) for _ in range(4)])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for layer in self.layers:
            x = paddle.tanh(layer(x))
        return x.mean(axis=1, keepdim=True)


class ToyStage(TrainModule):
    name = "toy"

    def build_model(self) -> paddle.nn.Layer:
        paddle.seed(self.cfg.Global.seed)
        return ToyNet()

    def train_batches(self, rank: int, world_size: int) -> GlobalSliceBatches:
        return GlobalSliceBatches(self.cfg.Global.seed, self.cfg.Data.batch_size, rank, world_size)

    def training_step(self, ctx: StepContext, batch: dict[str, Any]):
        pred = ctx(paddle.to_tensor(batch["x"]))
        loss = paddle.mean((pred - paddle.to_tensor(batch["y"])) ** 2)
        return loss, {}

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["x"].shape[0])

    def flops_per_token(self) -> float:
        return 6.0 * 4 * WIDTH * WIDTH

    def validate(self, model: paddle.nn.Layer, step: int) -> dict[str, float]:
        return {}

    def save_extras(self, model: paddle.nn.Layer, ckpt_dir: Path) -> None:
        (Path(ckpt_dir) / "toy.txt").write_text("toy stage")


def toy_overrides(out: Path, steps: int, batch: int, **kw: Any) -> list[str]:
    o = [f"Global.output_dir={out}", f"Train.max_steps={steps}", f"Data.batch_size={batch}",
         "Train.log_every=1", "Train.eval_every=0", "Train.save_every=3", "Train.keep_last=3",
         "Train.progress_bar=false", "Optimizer.lr=0.05", "Optimizer.warmup_steps=1",
         "Optimizer.weight_decay=0.01"]
    return o + [f"{k}={v}" for k, v in kw.items()]
