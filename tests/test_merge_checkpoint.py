"""tools/merge_checkpoint.py on single-process checkpoints of the toy stage, and the stage-3
refusal's advice followed to the letter (the 2-process merges are in test_distributed.py)."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_stage import ToyStage, toy_overrides  # noqa: E402

from ernie_vilg.config import load_config, load_saved_config  # noqa: E402
from ernie_vilg.checkpoint_io import CheckpointError, list_checkpoints, load_model_state  # noqa: E402
from ernie_vilg.training.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def merge_tool():
    spec = importlib.util.spec_from_file_location("merge_checkpoint_tool", REPO / "tools" / "merge_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_run(out: Path, steps: int = 3, **kw) -> Trainer:
    cfg = load_config(None, toy_overrides(out, steps, 8, **kw))
    trainer = Trainer(cfg, ToyStage(cfg))
    trainer.fit()
    return trainer


def test_merge_writes_one_loadable_folder_and_casts(tmp_path, capsys):
    run = toy_run(tmp_path / "run")
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    tool = merge_tool()
    assert tool.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0  # a run folder: newest
    merged = tmp_path / "merged"
    names = {p.name for p in merged.iterdir()}
    assert {"model-00001-of-00001.safetensors", "model.safetensors.index.json", "config.yaml", "meta.json",
            "toy.txt"} <= names  # the stage's extras come along
    assert not {"optimizer-00001-of-00001.safetensors", "trainer_state.pd"} & names  # weights only unless --with-optimizer
    source, out = load_model_state(ckpt), load_model_state(merged)
    assert source.keys() == out.keys()
    for key in source:
        np.testing.assert_array_equal(out[key].numpy(), source[key].numpy())
    meta = json.loads((merged / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["merged_from"] == str(ckpt)
    # --dtype casts floating-point weights; --with-optimizer keeps the resumable state
    assert tool.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "half"), "--dtype", "float16",
                      "--with-optimizer"]) == 0
    half = load_model_state(tmp_path / "half")
    assert all(v.dtype == paddle.float16 for v in half.values())
    assert (tmp_path / "half" / "optimizer.safetensors.index.json").is_file()
    assert (tmp_path / "half" / "trainer_state.pd").is_file()
    # the output must not be the checkpoint itself; errors are one line and exit code 2
    assert tool.main(["--ckpt", str(ckpt), "--out", str(ckpt)]) == 2
    assert "must differ" in capsys.readouterr().err
    del run


def test_merged_checkpoint_with_optimizer_resumes_exactly(tmp_path):
    full = toy_run(tmp_path / "full", steps=6)
    step3 = tmp_path / "full" / "checkpoints" / "step-00000003"
    assert merge_tool().main(["--ckpt", str(step3), "--out", str(tmp_path / "merged"), "--with-optimizer"]) == 0
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "merged", tmp_path / "resumed" / "checkpoints" / "step-00000003")
    resumed = toy_run(tmp_path / "resumed", steps=6)
    losses = lambda t: [r["loss"] for r in t.history if r["split"] == "train"]  # noqa: E731
    assert losses(resumed) == losses(full)[3:]


def _fake_stage3(ckpt: Path) -> None:
    """Turn a single-process checkpoint into what a 2-rank stage-3 run writes (sliced shards)."""
    from ernie_vilg.checkpoint_io import load_optimizer_state

    opt = load_optimizer_state(ckpt)
    for f in ckpt.glob("optimizer*"):
        f.unlink()
    for r in range(2):
        paddle.save(opt, str(ckpt / f"optimizer.shard-{r:02d}-of-02.pdopt"))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(optimizer_layout="sliced", sharding_stage=3, sharding_degree=2, world_size=2)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_stage3_refusal_gives_advice_that_works(tmp_path, capsys):
    toy_run(tmp_path / "run")
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    _fake_stage3(ckpt)
    with pytest.raises(CheckpointError, match="sharding_degree=2") as info:
        toy_run(tmp_path / "run", steps=6)
    message = str(info.value)
    tool = merge_tool()
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    usage = capsys.readouterr().out
    flags = re.findall(r"(?<![\w-])--[a-z][a-z-]*", message)
    assert flags and all(flag in usage for flag in flags), flags  # every flag it names exists
    # follow it: merge the weights, resume them with Train.resume_weights_only=true
    assert tool.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    assert "resume_weights_only=true" in message
    (tmp_path / "again" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "merged", tmp_path / "again" / "checkpoints" / ckpt.name)
    cfg = load_config(None, toy_overrides(tmp_path / "again", 6, 8, **{"Train.resume_weights_only": "true"}))
    trainer = Trainer(cfg, ToyStage(cfg))
    assert trainer.step == 3
    state = load_model_state(ckpt)
    for key, value in trainer.inner.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key].numpy())
    assert load_saved_config(tmp_path / "merged" / "config.yaml").Distributed.sharding_degree == 1
