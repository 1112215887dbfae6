"""Checkpoint commits never leave fewer complete checkpoints than before (issue 21): a writer
killed between the two renames of a re-save, a full disk, a dead writer's leftovers; one run per
output folder (lock file); resume refuses a checkpoint missing a file it needs; the training log
of a resumed run equals an uninterrupted run's."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_stage import ToyStage, toy_overrides  # noqa: E402

from ernie_vilg.config import load_config  # noqa: E402
from ernie_vilg import checkpoint_io as ckpt_mod  # noqa: E402
from ernie_vilg.checkpoint_io import (  # noqa: E402
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from ernie_vilg.training.checkpoint import OutputLock  # noqa: E402
from ernie_vilg.training.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def toy_cfg(out: Path, steps: int = 6, **kw):
    return load_config(None, toy_overrides(out, steps, 4, **kw))


def small_save(root: Path, step: int, name: str | None = None, keep_last: int = 0) -> Path:
    cfg = load_config(None, [])
    return save_checkpoint(root, step, cfg, {"w": paddle.ones([2])}, keep_last=keep_last, name=name)


# ---- re-saving a step / best: a kill between the two renames ------------------------------------
@pytest.mark.parametrize("name", [None, "best"])
def test_a_kill_between_the_renames_of_a_resave_loses_no_checkpoint(tmp_path, name):
    root = tmp_path / "checkpoints"
    final = small_save(root, 3, name)
    # the state a SIGKILL between `final -> .old` and `.tmp -> final` leaves: two complete copies
    pid = dead_pid()
    shutil.copytree(final, root / f"{final.name}.tmp-{pid}")
    final.rename(root / f"{final.name}.old-{pid}")
    assert list_checkpoints(root) == []
    # the next save (keep_last=1) used to prune both copies; now they are recovered first
    small_save(root, 1, keep_last=1) if name is None else ckpt_mod.recover_interrupted(root)
    assert (root / final.name / "meta.json").is_file()
    assert not [d for d in root.iterdir() if ".tmp-" in d.name or ".old-" in d.name]
    if name is None:
        assert latest_checkpoint(root) == root / final.name


def test_the_trainer_resumes_from_a_recovered_resave(tmp_path):
    cfg = toy_cfg(tmp_path, steps=6)
    Trainer(cfg, ToyStage(cfg)).fit(until_step=3)
    root = tmp_path / "checkpoints"
    step3 = root / "step-00000003"
    pid = dead_pid()
    shutil.copytree(step3, root / f"{step3.name}.tmp-{pid}")
    step3.rename(root / f"{step3.name}.old-{pid}")
    trainer = Trainer(cfg, ToyStage(cfg))
    assert trainer.step == 3 and trainer.resumed_from == step3


# ---- disk full -----------------------------------------------------------------------------------
def test_a_full_disk_gives_one_line_and_removes_its_partial_folder(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    small_save(root, 1)

    def full_disk(folder, prefix, *a, **k):
        (Path(folder) / f"{prefix}-00001-of-00001.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "write_shard", full_disk)
    with pytest.raises(CheckpointError) as info:
        small_save(root, 2)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "step-00000002" in message
    assert sorted(d.name for d in root.iterdir()) == ["step-00000001"]  # no .tmp left, the old one intact


def test_dead_writers_tmp_folders_are_removed_before_a_save(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    small_save(root, 1)
    for i in range(3):  # three earlier resumes that died on a full disk
        junk = root / f"step-0000000{i + 2}.tmp-{dead_pid()}"
        junk.mkdir()
        (junk / "model.pdparams").write_bytes(b"x" * 100)
    monkeypatch.setattr(ckpt_mod, "write_shard", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(CheckpointError):
        small_save(root, 5)
    assert sorted(d.name for d in root.iterdir()) == ["step-00000001"]


def test_non_finite_weights_are_never_written(tmp_path):
    root = tmp_path / "checkpoints"
    small_save(root, 1)
    cfg = load_config(None, [])
    state = {"w": paddle.to_tensor(np.array([1.0, np.nan], dtype="float32"))}
    with pytest.raises(CheckpointError, match=r"non-finite weights .* in w"):
        save_checkpoint(root, 2, cfg, state)
    assert sorted(d.name for d in root.iterdir()) == ["step-00000001"]


# ---- one run per output folder -------------------------------------------------------------------
def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".lock"
        import socket

        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(CheckpointError, match=rf"in use by another training run \(pid {other.pid}\)"):
            OutputLock(tmp_path).acquire()
        assert OutputLock(tmp_path).try_acquire() is False  # the non-blocking claim (Table 7's work items)
        (tmp_path / "item.lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
        assert OutputLock(tmp_path, "item.lock").try_acquire() is True  # a dead claimer's item is taken over
        assert json.loads((tmp_path / "item.lock").read_text())["pid"] == os.getpid()
        cfg = toy_cfg(tmp_path)
        with pytest.raises(CheckpointError, match="in use by another training run"):
            Trainer(cfg, ToyStage(cfg))
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_and_released_at_the_end(tmp_path):
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    cfg = toy_cfg(tmp_path, steps=2)
    trainer = Trainer(cfg, ToyStage(cfg))
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    trainer.fit()
    assert not (tmp_path / ".lock").exists()


def test_train_tool_refuses_a_locked_folder_with_one_line(tmp_path):
    import socket

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
        proc = subprocess.run([sys.executable, str(REPO / "tools/train.py"), "-c", str(REPO / "configs/vq/tiny_vqvae.yaml"),
                               "-o", f"Global.output_dir={tmp_path}", "-o", f"Data.train_manifest={tmp_path / 'm.jsonl'}"],
                              capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    finally:
        other.kill()
        other.wait()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"in use by another training run (pid {other.pid})" in lines[0]


# ---- resume refuses a checkpoint missing what it needs --------------------------------------------
@pytest.fixture()
def stopped_run(tmp_path):
    cfg = toy_cfg(tmp_path / "run", steps=6)
    Trainer(cfg, ToyStage(cfg)).fit(until_step=3)
    return tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-00000003"


def test_resume_refuses_a_checkpoint_without_optimizer_state(stopped_run):
    out, ckpt = stopped_run
    for f in ckpt.glob("optimizer*"):
        f.unlink()
    cfg = toy_cfg(out, steps=6)
    with pytest.raises(CheckpointError, match=r"no optimizer state \(.*\); set Train.resume_weights_only"):
        Trainer(cfg, ToyStage(cfg))
    weights_only = toy_cfg(out, steps=6, **{"Train.resume_weights_only": "true"})
    trainer = Trainer(weights_only, ToyStage(weights_only))
    assert trainer.step == 3 and trainer.resumed_from == ckpt


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_refuses_a_truncated_or_missing_trainer_state(stopped_run, damage):
    out, ckpt = stopped_run
    state = ckpt / "trainer_state.pd"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:40])
    else:
        state.unlink()
    cfg = toy_cfg(out, steps=6)
    with pytest.raises(CheckpointError, match=r"trainer_state.pd.*Train.resume_weights_only=true") as info:
        Trainer(cfg, ToyStage(cfg))
    assert "\n" not in str(info.value)
    weights_only = toy_cfg(out, steps=6, **{"Train.resume_weights_only": "true"})
    assert Trainer(weights_only, ToyStage(weights_only)).step == 3


# ---- the training log of a resumed run -------------------------------------------------------------
def train_records(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], round(r["loss"], 6)) for r in rows if r.get("split") == "train"]


def test_a_run_resumed_mid_window_logs_what_an_uninterrupted_run_logs(tmp_path):
    kw = {"Train.log_every": 4, "Train.save_every": 0}
    whole = toy_cfg(tmp_path / "whole", steps=8, **kw)
    Trainer(whole, ToyStage(whole)).fit()
    parts = toy_cfg(tmp_path / "parts", steps=8, **kw)
    Trainer(parts, ToyStage(parts)).fit(until_step=2)  # stops (and saves) inside the first window
    Trainer(parts, ToyStage(parts)).fit()
    assert train_records(tmp_path / "parts") == train_records(tmp_path / "whole")


def test_steps_trained_twice_after_a_kill_are_logged_once(tmp_path):
    cfg = toy_cfg(tmp_path, steps=6, **{"Train.log_every": 1, "Train.save_every": 3})
    Trainer(cfg, ToyStage(cfg)).fit(until_step=5)
    # a kill before step 5's save: its checkpoint never existed, steps 4-5 are trained again
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000005")
    Trainer(cfg, ToyStage(cfg)).fit()
    steps = [s for s, _ in train_records(tmp_path)]
    assert steps == [1, 2, 3, 4, 5, 6]
