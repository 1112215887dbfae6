"""AMP: refused on CPU with a clear message; on GPU the scaler's decisions drive skipped steps
(tested with a recording scaler, since float16 kernels need a GPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_stage import ToyStage, toy_overrides  # noqa: E402

from ernie_vilg.config import ConfigError, load_config  # noqa: E402
from ernie_vilg.training import amp  # noqa: E402
from ernie_vilg.training.distributed import FleetApi, ParallelContext, Topology  # noqa: E402
from ernie_vilg.training.trainer import Trainer, build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_amp_on_cpu_fails_clearly():
    cfg = load_config(None, ["Distributed.amp_dtype=float16", "Distributed.amp_level=O2"])
    with pytest.raises(ConfigError, match="silently fall back to float32"):
        ParallelContext.create(cfg)


def test_train_tool_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("Global:\n  stage: vq\nDistributed:\n  amp_dtype: bfloat16\n")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(cfg),
                           "-o", f"Global.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "amp_dtype=bfloat16 needs a GPU" in proc.stderr.strip().splitlines()[-1]


class ScriptedScaler:
    """GradScaler stand-in: scales the loss, unscales gradients, skips steps flagged in `infs`."""

    def __init__(self, infs: set[int], scale: float = 1024.0) -> None:
        self.infs, self.calls = infs, 0
        self._scale = paddle.to_tensor([scale])
        self._cache_found_inf = None

    def scale(self, loss):
        return loss * float(self._scale)

    def step(self, optimizer):
        self._cache_found_inf = self.calls in self.infs
        self.calls += 1
        if not self._cache_found_inf:
            for p in optimizer._parameter_list:
                p.grad.set_value(p.grad / float(self._scale))
            optimizer.step()

    def update(self):
        if self._cache_found_inf:
            self._scale = self._scale * 0.5

    def state_dict(self):
        return {"scale": float(self._scale), "calls": self.calls}

    def load_state_dict(self, state):
        self._scale, self.calls = paddle.to_tensor([state["scale"]]), state["calls"]


class GpuLikeApi(FleetApi):
    def __init__(self, scaler):
        self.scaler, self.decorated = scaler, []

    def decorate(self, model, optimizer, level, dtype):
        self.decorated.append((level, dtype))
        return model, optimizer

    def grad_scaler(self, init_loss_scaling):
        return self.scaler


def gpu_like_trainer(out: Path, scaler, steps: int = 5):
    cfg = load_config(None, toy_overrides(out, steps, 8, **{"Distributed.amp_dtype": "float16",
                                                            "Distributed.amp_level": "O2"}))
    api = GpuLikeApi(scaler)
    ctx = ParallelContext(cfg, Topology(1, 0, 1, 1, 1, "gpu"), api)
    return Trainer(cfg, ToyStage(cfg), parallel=ctx), api


def test_scaler_skips_are_counted_and_leave_weights_unchanged(tmp_path):
    trainer, api = gpu_like_trainer(tmp_path, ScriptedScaler(infs={1, 2}), steps=2)
    assert api.decorated == [("O2", "float16")] and trainer.scaler_kind == "GradScaler"
    trainer.fit(until_step=1)
    before = {k: v.numpy().copy() for k, v in trainer.inner.state_dict().items()}
    trainer.fit()  # step 2 is flagged inf: skipped
    assert trainer.skipped_steps == 1
    assert all(np.array_equal(before[k], v.numpy()) for k, v in trainer.inner.state_dict().items())
    record = [r for r in trainer.history if r["split"] == "train"][-1]
    assert record["skipped_steps"] == 1 and record["loss_scale"] == 512.0


def test_scaled_training_matches_unscaled_and_scaler_state_resumes(tmp_path):
    plain_cfg = load_config(None, toy_overrides(tmp_path / "plain", 5, 8))
    plain = Trainer(plain_cfg, ToyStage(plain_cfg))
    plain.fit()
    scaled, _ = gpu_like_trainer(tmp_path / "scaled", ScriptedScaler(infs={3}))
    scaled.fit()
    assert scaled.skipped_steps == 1
    # the scaler's state is in the checkpoint and comes back on resume
    again, _ = gpu_like_trainer(tmp_path / "scaled", ScriptedScaler(infs=set()))
    assert again.step == 5 and again.scaler.calls == 5 and float(again.scaler._scale) == 512.0
    # without skips the scaled run equals the fp32 run (scale then unscale is exact for powers of 2)
    clean, _ = gpu_like_trainer(tmp_path / "clean", ScriptedScaler(infs=set()))
    clean.fit()
    for k, v in plain.inner.state_dict().items():
        np.testing.assert_allclose(clean.inner.state_dict()[k].numpy(), v.numpy(), rtol=1e-6, atol=1e-7)


def test_o2_keeps_float32_master_weights():
    cfg = load_config(None, ["Distributed.amp_dtype=bfloat16", "Distributed.amp_level=O2"])
    assert build_optimizer(paddle.nn.Linear(2, 2), cfg)._multi_precision
    assert not build_optimizer(paddle.nn.Linear(2, 2), load_config(None, []))._multi_precision


def test_scaler_helpers_read_wrapped_scalers():
    inner = SimpleNamespace(_cache_found_inf=True, _scale=paddle.to_tensor([8.0]))
    assert amp.found_inf(SimpleNamespace(_scaler=inner)) and amp.loss_scale(SimpleNamespace(_scaler=inner)) == 8.0
    assert amp.loss_scale(None) is None
