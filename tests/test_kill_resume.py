"""Kill anywhere, lose nothing: training (tools/train.py's entry point, tiny vilg config) is SIGKILLed
at random moments, including in the middle of writing a checkpoint, and resumed each time. After
every kill the newest complete checkpoint loads; the final weights equal an uninterrupted run's
bit for bit (same seed, same data order). Once more with 2 processes (sharding stage 1).

Speed: importing paddle + paddlenlp costs ~10 s per process on this machine, so the single-process
test starts one "zygote" process that imports everything once and forks a fresh child per
attempt; each child is a real OS process running `ernie_vilg.cli.train.main` and is killed with a
real SIGKILL. A child's checkpoint fsync sleeps a little (a slow disk), so "kill while the
checkpoint is being written" is hit on purpose, not by luck.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vilg_fixture import write_tiny_vilg_data  # noqa: E402

from ernie_vilg.config import load_saved_config  # noqa: E402
from ernie_vilg.convert.safetensors_io import build_model_for  # noqa: E402
from ernie_vilg.checkpoint_io import (  # noqa: E402
    pid_alive,
    latest_checkpoint,
    load_model_state,
    load_optimizer_state,
    read_meta,
    set_model_state,
)

REPO = Path(__file__).resolve().parents[1]
# enough steps that six bounded attempts (each kills within a few steps of its start) never finish the run
STEPS = 24
SLOW_SAVE = 0.25  # seconds each checkpoint fsync sleeps in the killed runs

ZYGOTE = r"""
import json, os, sys, time, traceback
import paddle, paddlenlp  # noqa: F401  (imported once; every forked child shares them)
import ernie_vilg.stages.vilg, ernie_vilg.training.trainer  # noqa: F401
import ernie_vilg.checkpoint_io as ck
from ernie_vilg.cli.train import main

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if cmd["slow_save"]:
            fsync = ck._fsync_files
            def slow_fsync(folder, names=None, _fsync=fsync, _delay=cmd["slow_save"]):
                time.sleep(_delay)  # a slow disk: the checkpoint stays half-written for a while
                _fsync(folder, names)
            ck._fsync_files = slow_fsync
        try:
            code = main(cmd["argv"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status}), flush=True)
"""


class Zygote:
    def __init__(self, log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, cwd=REPO, env=env)
        assert self._read().get("ready")

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("zygote died")
        return json.loads(line)

    def start(self, argv: list[str], log: Path, slow_save: float = 0.0) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "slow_save": slow_save}) + "\n")
        self.proc.stdin.flush()
        return int(self._read()["pid"])

    def wait(self) -> int:
        return int(self._read()["status"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def train_argv(data: list[str], out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = data + [f"Global.output_dir={out}", f"Train.max_steps={STEPS}", "Train.save_every=1",
                        "Train.keep_last=3", "Train.eval_every=0", "Train.log_every=1", "Train.progress_bar=false",
                        "Global.num_threads=1", *extra]
    return ["-c", str(REPO / "configs" / "vilg" / "tiny.yaml")] + [a for o in overrides for a in ("-o", o)]


def wait_for(condition, timeout: float, poll: float = 0.002) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        time.sleep(poll)
    return False


def half_written(root: Path, tag: Optional[int] = None) -> bool:
    """A checkpoint being written: its temporary folder already holds a file."""
    pattern = f"*.tmp-{tag}" if tag is not None else "*.tmp-*"
    return any(d.is_dir() and any(d.iterdir()) for d in root.glob(pattern)) if root.is_dir() else False


def step_of(ckpt: Optional[Path]) -> int:
    return int(ckpt.name.split("-")[1]) if ckpt is not None else 0


def assert_newest_checkpoint_loads(root: Path) -> int:
    """The newest complete checkpoint loads in full: weights (strictly, into the model its config
    builds), optimizer state and trainer state at the step its name says. Returns that step."""
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        return 0
    step = step_of(ckpt)
    cfg = load_saved_config(ckpt / "config.yaml")
    set_model_state(build_model_for(cfg), load_model_state(ckpt), ckpt)
    assert load_optimizer_state(ckpt) is not None
    assert int(paddle.load(str(ckpt / "trainer_state.pd"))["step"]) == step == read_meta(ckpt)["step"]
    return step


def final_weights(out: Path) -> dict[str, np.ndarray]:
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and read_meta(ckpt)["step"] == STEPS
    return {k: v.numpy() for k, v in load_model_state(ckpt).items()}


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs from the uninterrupted run"


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    data = write_tiny_vilg_data(tmp_path / "data")
    zygote = Zygote(tmp_path / "zygote.log")
    try:
        reference = tmp_path / "reference"
        zygote.start(train_argv(data, reference), tmp_path / "reference.log")
        assert zygote.wait() == 0, (tmp_path / "reference.log").read_text()[-3000:]

        run = tmp_path / "run"
        root = run / "checkpoints"
        rng = random.Random(8)
        kills, mid_save, steps_seen = 0, 0, []
        for attempt, mode in enumerate(["mid-save", "random", "mid-save", "random", "mid-save", "random"]):
            log = tmp_path / f"attempt-{attempt}.log"
            pid = zygote.start(train_argv(data, run), log, slow_save=SLOW_SAVE)
            before = steps_seen[-1] if steps_seen else 0
            if mode == "mid-save":  # after this run has saved once: in the middle of its next save
                hit = wait_for(lambda: step_of(latest_checkpoint(root)) > before and half_written(root, pid),
                               timeout=60)
            else:  # a random moment, at most a couple of saves into this attempt: steps got fast, and an
                # attempt that outruns the kill finishes the job and leaves nothing to resume
                saves = rng.randint(0, 2)
                wait_for(lambda: step_of(latest_checkpoint(root)) >= before + saves, timeout=60)
                time.sleep(rng.uniform(0.0, 0.3))
                hit = False
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status = zygote.wait()
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                kills += 1
                mid_save += int(hit and half_written(root, pid))  # died with its checkpoint half written
            else:
                assert status == 0, log.read_text()[-3000:]
            steps_seen.append(assert_newest_checkpoint_loads(root))
        print(f"kills={kills} mid_save={mid_save} newest step after each kill={steps_seen}")
        assert kills >= 4 and mid_save >= 2, (kills, mid_save, steps_seen)
        assert steps_seen == sorted(steps_seen) and steps_seen[-1] > 0  # progress is never lost

        zygote.start(train_argv(data, run), tmp_path / "final.log")
        assert zygote.wait() == 0, (tmp_path / "final.log").read_text()[-3000:]
    finally:
        zygote.close()
    assert_bitwise_equal(final_weights(run), final_weights(reference))
    assert not list(root.glob("*.tmp-*"))  # the dead runs' half-written folders were cleaned up


# --------------------------------------------------------------------------------------------
# two processes (paddle.distributed.launch, sharding stage 1)
# --------------------------------------------------------------------------------------------
WORKER = r"""
import sys, time
import ernie_vilg.checkpoint_io as ck
delay = float(sys.argv[1])
if delay:
    fsync = ck._fsync_files
    def slow_fsync(folder, names=None):
        time.sleep(delay)  # a slow disk: the checkpoint stays half-written for a while
        fsync(folder, names)
    ck._fsync_files = slow_fsync
from ernie_vilg.cli.train import main
raise SystemExit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(tmp: Path, name: str, argv: list[str], slow_save: float) -> subprocess.Popen:
    worker = tmp / "kill_worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--master",
           f"127.0.0.1:{free_port()}", "--log_dir", str(tmp / f"{name}-logs"), str(worker), str(slow_save), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it. paddle.distributed.launch starts each worker in
    its own session (os.setsid), so killing the launcher's process group leaves the workers running."""
    tree, pids, todo = _children(), [], [proc.pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    assert wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=60), "a worker survived SIGKILL"


def finish(proc: subprocess.Popen, tmp: Path, name: str) -> None:
    if proc.wait(timeout=300) != 0:
        logs = "\n".join(f.read_text()[-3000:] for f in sorted((tmp / f"{name}-logs").glob("workerlog.*")))
        pytest.fail(f"{name} failed:\n{logs}")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_sharded_run_killed_mid_checkpoint_resumes_exactly(tmp_path):
    data = write_tiny_vilg_data(tmp_path / "data")
    sharded = ("Data.batch_size=4", "Distributed.sharding_degree=2", "Distributed.accumulate_steps=2")
    reference = tmp_path / "reference"
    finish(launch_two(tmp_path, "reference", train_argv(data, reference, sharded), 0.0), tmp_path, "reference")

    run = tmp_path / "run"
    root = run / "checkpoints"
    proc = launch_two(tmp_path, "killed", train_argv(data, run, sharded), SLOW_SAVE)
    # the second checkpoint: both ranks' files are going in while rank 0 has not committed
    hit = wait_for(lambda: latest_checkpoint(root) is not None and half_written(root), timeout=240)
    kill_job(proc)
    assert hit, "the run ended before a checkpoint could be interrupted"
    assert half_written(root)  # killed with a half-written checkpoint on disk
    step = assert_newest_checkpoint_loads(root)
    assert 0 < step < STEPS

    finish(launch_two(tmp_path, "resumed", train_argv(data, run, sharded), 0.0), tmp_path, "resumed")
    assert_bitwise_equal(final_weights(run), final_weights(reference))
    assert not list(root.glob("*.tmp-*"))
