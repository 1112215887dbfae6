"""The Trainer's loop, checkpoints and exact resume, with a tiny stand-in stage."""
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import pytest

from ernie_vilg.config import load_config
from ernie_vilg.checkpoint_io import (
    CheckpointError,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    set_model_state,
)
from ernie_vilg.training.schedule import learning_rate
from ernie_vilg.training.module import TrainModule
from ernie_vilg.training.trainer import Trainer


class CountingBatches:
    def __init__(self, seed: int) -> None:
        self.seed, self.pos = seed, 0

    def __iter__(self):
        while True:
            rng = np.random.default_rng(self.seed * 1000 + self.pos)
            self.pos += 1
            x = rng.normal(size=(8, 4)).astype("float32")
            yield {"x": x, "y": x @ np.arange(1, 5, dtype="float32")[:, None]}

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def set_state_dict(self, s: dict[str, Any]) -> None:
        self.pos = s["pos"]


class LinearStage(TrainModule):
    name = "toy"

    def build_model(self):
        paddle.seed(self.cfg.Global.seed)
        return paddle.nn.Sequential(paddle.nn.Linear(4, 8), paddle.nn.Dropout(0.2), paddle.nn.Linear(8, 1))

    def train_batches(self, rank, world_size):
        return CountingBatches(self.cfg.Global.seed)

    def training_step(self, ctx, batch):
        pred = ctx(paddle.to_tensor(batch["x"]))
        loss = paddle.mean((pred - paddle.to_tensor(batch["y"])) ** 2)
        return loss, {}

    def validate(self, model, step):
        return {"val_metric": float(step)}

    def save_extras(self, model, d: Path):
        (d / "extra.txt").write_text("hello")


def make_cfg(tmp_path, steps, **kw):
    o = [f"Global.output_dir={tmp_path}", f"Train.max_steps={steps}", "Train.log_every=1",
         "Train.eval_every=0", "Train.save_every=3", "Train.keep_last=2", "Optimizer.lr=0.01",
         "Optimizer.warmup_steps=2", "Train.progress_bar=false"]
    o += [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, o)


def train_losses(trainer):
    return [r["loss"] for r in trainer.history if r.get("split") == "train"]


def test_resume_continues_the_same_run_exactly(tmp_path):
    full = Trainer(make_cfg(tmp_path / "a", 8), LinearStage(make_cfg(tmp_path / "a", 8)))
    full.fit()
    first = Trainer(make_cfg(tmp_path / "b", 8), LinearStage(make_cfg(tmp_path / "b", 8)))
    first.fit(until_step=5)
    second = Trainer(make_cfg(tmp_path / "b", 8), LinearStage(make_cfg(tmp_path / "b", 8)))
    second.fit()
    assert second.history[0]["step"] == 6  # resumed, not restarted
    assert np.allclose(train_losses(first) + train_losses(second), train_losses(full), atol=0, rtol=0)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), second.model.state_dict().items()):
        assert np.array_equal(a.numpy(), b.numpy()), k


def test_checkpoint_folder_is_complete_and_pruned(tmp_path):
    cfg = make_cfg(tmp_path, 9)
    Trainer(cfg, LinearStage(cfg)).fit()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000006", "step-00000009"]  # keep_last=2
    last = resolve_checkpoint(tmp_path)
    assert last == ckpts[-1]
    for f in ("model-00001-of-00001.safetensors", "model.safetensors.index.json", "optimizer-00001-of-00001.safetensors",
              "optimizer.safetensors.index.json", "trainer_state.pd", "config.yaml", "meta.json", "extra.txt"):
        assert (last / f).is_file(), f
    assert "max_steps: 9" in (last / "config.yaml").read_text()


def test_interrupted_save_is_ignored(tmp_path):
    cfg = make_cfg(tmp_path, 3)
    Trainer(cfg, LinearStage(cfg)).fit()
    root = tmp_path / "checkpoints"
    # a crashed save: temporary folder with partial content
    broken = root / "step-00000099.tmp-999999"
    broken.mkdir()
    (broken / "model.pdparams").write_bytes(b"partial")
    assert resolve_checkpoint(tmp_path).name == "step-00000003"
    # a step folder missing meta.json is not complete either
    half = root / "step-00000050"
    half.mkdir()
    (half / "model.pdparams").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(CheckpointError, match="missing config.yaml, meta.json"):
        resolve_checkpoint(half)


def test_shape_mismatch_names_the_key(tmp_path):
    model = paddle.nn.Linear(4, 2)
    other = paddle.nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match=r"weight has shape \[4, 3\]"):
        set_model_state(model, other.state_dict(), tmp_path)


def test_warmup_then_cosine():
    cfg = load_config(None, ["Optimizer.lr=1.0", "Optimizer.warmup_steps=4", "Train.max_steps=14",
                             "Optimizer.min_lr=0.1"])
    lrs = [learning_rate(s, cfg) for s in range(15)]
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)


def test_stages_get_the_users_layer_and_forward_through_the_distributed_wrapper(tmp_path):
    """Fleet wraps the model (`_layers`) under dp / sharding; validation decodes through the
    model's own methods and attributes, which a wrapper does not forward, so it gets the inner layer.
    A training step gets both: `ctx.model` (the inner layer) and `ctx(...)`, the wrapper's forward
    (where DataParallel hooks its gradient reduction)."""

    class Wrapper(paddle.nn.Layer):  # stands in for paddle.DataParallel / Fleet's ShardingParallel
        def __init__(self, layers):
            super().__init__()
            self._layers = layers

        def forward(self, *args):
            return self._layers(*args)

    seen, steps = [], []

    class RecordingStage(LinearStage):
        def validate(self, model, step):
            seen.append(model)
            return {"val_metric": float(step)}

        def training_step(self, ctx, batch):
            steps.append((ctx.step, ctx.model, ctx.forward))
            return super().training_step(ctx, batch)

    cfg = make_cfg(tmp_path, 2, **{"Train.eval_every": 2})
    trainer = Trainer(cfg, RecordingStage(cfg))
    trainer.model = Wrapper(trainer.inner)
    trainer.fit()
    assert seen and all(m is trainer.inner for m in seen)
    assert [s for s, _, _ in steps] == [0, 1]
    assert all(m is trainer.inner and f is trainer.model for _, m, f in steps)
    assert [r["val_metric"] for r in trainer.history if r.get("split") == "val"][-1] == 2.0


def test_a_dead_writers_leftover_is_pruned_even_while_it_is_an_unreaped_zombie(tmp_path):
    """A writer SIGKILLed with its launcher stays a zombie where pid 1 does not reap (some containers);
    its half-written folder must still count as dead, or every later run keeps it forever."""
    import os
    import time

    from ernie_vilg.checkpoint_io import prune_checkpoints

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.time() + 10
        while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z" and time.time() < deadline:
            time.sleep(0.01)
        root = tmp_path / "checkpoints"
        leftover = root / f"step-00000003.tmp-{pid}"
        leftover.mkdir(parents=True)
        (leftover / "model.pdparams").write_bytes(b"half")
        alive = root / f"step-00000004.tmp-{os.getppid()}"  # a live writer's folder stays
        alive.mkdir()
        prune_checkpoints(root, keep_last=2)
        assert not leftover.exists()
        assert alive.exists()
    finally:
        os.waitpid(pid, 0)
