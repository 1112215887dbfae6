"""fleet_launch/*.sh under test: the CPU single-node launch trains and checkpoints, two "nodes" on
127.0.0.1 train together through multi_node.sh, and the lite / 10B scripts' dry runs print the
exact command after the topology check passes (and stop when it fails)."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vilg_fixture import write_tiny_vilg_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "fleet_launch"
PREFIX = "dry run, would execute:"


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("DEVICES", "IPS", "MASTER", "NNODES", "NPROC", "NODE_RANK", "DRY_RUN", "LOG_DIR"):
        out.pop(key, None)  # the caller's shell must not steer the scripts under test
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dry_run_command(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    assert len(line) == 1, proc.stdout
    return shlex.split(line[0][len(PREFIX):])


def overrides(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, tok in enumerate(cmd) if tok == "-o"]


def test_10b_dry_run_prints_the_command_after_the_topology_check(tmp_path):
    proc = subprocess.run([str(LAUNCH / "ernie_vilg_10b_multi_node.sh")], capture_output=True, text=True,
                          env=env(DRY_RUN="1", IPS="10.0.0.1,10.0.0.2", LOG_DIR=str(tmp_path / "logs")), timeout=120)
    cmd = dry_run_command(proc)
    assert "world 16 = dp 2 x sharding 8 on gpu; sharding stage 3" in proc.stdout
    assert cmd[:3] == [sys.executable, "-m", "paddle.distributed.launch"]
    flags = dict(zip(cmd[3:13:2], cmd[4:14:2]))
    assert flags == {"--master": "10.0.0.1:8090", "--nnodes": "2", "--ips": "10.0.0.1,10.0.0.2",
                     "--devices": "0,1,2,3,4,5,6,7", "--log_dir": str(tmp_path / "logs")}
    assert cmd[13:16] == [str(REPO / "tools" / "train.py"), "-c", str(REPO / "configs" / "vilg" / "ernie_vilg_10b.yaml")]
    assert overrides(cmd) == ["Distributed.sharding_degree=8", "Distributed.dp_degree=2",
                              "Distributed.sharding_stage=3", "Distributed.offload=true"]
    assert not (tmp_path / "logs").exists()  # nothing started


def test_lite_dry_run_and_a_failing_topology_check(tmp_path):
    proc = subprocess.run([str(LAUNCH / "lite_300m_one_node.sh"), "-o", "Train.max_steps=10"], capture_output=True,
                          text=True, env=env(DRY_RUN="1"), timeout=120)
    cmd = dry_run_command(proc)
    assert "world 8 = dp 8 x sharding 1 on gpu" in proc.stdout
    assert cmd[cmd.index("--devices") + 1] == "0,1,2,3,4,5,6,7" and cmd[cmd.index("--nnodes") + 1] == "1"
    assert str(REPO / "configs" / "vilg" / "lite_300m.yaml") in cmd
    assert overrides(cmd) == ["Distributed.dp_degree=8", "Distributed.sharding_degree=1",
                              "Distributed.sharding_stage=1", "Train.max_steps=10"]
    # four GPUs: the dp degree follows DEVICES
    four = dry_run_command(subprocess.run([str(LAUNCH / "lite_300m_one_node.sh")], capture_output=True, text=True,
                                          env=env(DRY_RUN="1", DEVICES="0,1,2,3"), timeout=120))
    assert "Distributed.dp_degree=4" in overrides(four)
    # a layout that does not match the processes fails the check: no command is printed
    bad = subprocess.run([str(LAUNCH / "lite_300m_one_node.sh"), "-o", "Distributed.sharding_degree=2"],
                         capture_output=True, text=True, env=env(DRY_RUN="1"), timeout=120)
    assert bad.returncode != 0 and PREFIX not in bad.stdout
    assert "Distributed" in bad.stderr + bad.stdout


def _tiny_run(tmp_path: Path) -> tuple[Path, list[str]]:
    out = tmp_path / "run"
    opts = write_tiny_vilg_data(tmp_path / "data") + [
        f"Global.output_dir={out}", "Train.max_steps=2", "Train.save_every=2", "Train.eval_every=0",
        "Train.log_every=1", "Train.progress_bar=false", "Data.batch_size=2", "Distributed.sharding_degree=2"]
    args: list[str] = []
    for o in opts:
        args += ["-o", o]
    return out, args


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {f}\n{f.read_text()[-2000:]}" for f in sorted(folder.rglob("workerlog.*")))


@pytest.mark.distributed
@pytest.mark.slow
def test_single_node_script_two_cpu_processes_train_and_checkpoint(tmp_path):
    out, args = _tiny_run(tmp_path)
    proc = subprocess.run([str(LAUNCH / "single_node.sh"), str(REPO / "configs" / "vilg" / "tiny.yaml"), *args],
                          capture_output=True, text=True, timeout=400,
                          env=env(NPROC="2", LOG_DIR=str(tmp_path / "logs")))
    assert proc.returncode == 0, proc.stderr[-2000:] + _logs(tmp_path / "logs")
    assert "world 2 = dp 1 x sharding 2 on cpu" in proc.stdout
    ckpt = out / "checkpoints" / "step-00000002"
    assert (ckpt / "meta.json").is_file() and (ckpt / "model.safetensors.index.json").is_file()
    assert sorted(f.name for f in ckpt.glob("optimizer-*")) == ["optimizer-00001-of-00002.safetensors",
                                                                "optimizer-00002-of-00002.safetensors"]
    assert sorted(f.name for f in (tmp_path / "logs").glob("workerlog.*")) == ["workerlog.0", "workerlog.1"]


@pytest.mark.distributed
@pytest.mark.slow
def test_multi_node_script_as_two_nodes_on_one_host(tmp_path):
    """Two launches of multi_node.sh with NNODES=2 and one CPU process each meet at one
    rendezvous on 127.0.0.1 and train one sharding-2 job."""
    out, args = _tiny_run(tmp_path)
    master = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([str(LAUNCH / "multi_node.sh"), str(REPO / "configs" / "vilg" / "tiny.yaml"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(MASTER=master, NNODES="2", NPROC="1", NODE_RANK=str(rank),
                                      LOG_DIR=str(tmp_path / f"logs{rank}")))
             for rank in (0, 1)]
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-2000:] + _logs(tmp_path)
        assert "world 2 = dp 1 x sharding 2 on cpu" in stdout
    ckpt = out / "checkpoints" / "step-00000002"
    assert (ckpt / "meta.json").is_file()
    assert len(list(ckpt.glob("optimizer-*-of-00002.safetensors"))) == 2
    assert (tmp_path / "logs0" / "workerlog.0").is_file() and (tmp_path / "logs1" / "workerlog.0").is_file()
