"""What every tool promises: one line and exit code 2 on bad input, help texts that tell the truth."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["tools/human_eval.py", "sheet", "--items", "missing.jsonl", "--out", "x.html"], "file not found"),
    (["tools/eval_caption.py", "--pred", "missing.jsonl", "--ref", "missing.jsonl"], "missing.jsonl"),
    (["tools/convert_dataset.py", "--format", "coco", "--input", "missing.json", "--images", ".", "--out", "m.jsonl"],
     "missing.json"),
    (["tools/eval_fid.py", "--sample-captions", "missing.json", "--out", "p.jsonl"], "missing.json"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, needle) -> None:
    res = _run(str(REPO / args[0]), *[str(tmp_path / a) if a.startswith("missing") else a for a in args[1:]])
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.stderr


def test_train_help_lists_every_stage_and_a_launch_example() -> None:
    res = _run(str(REPO / "tools/train.py"), "--help")
    assert res.returncode == 0
    from ernie_vilg.stages import STAGES

    stages = list(STAGES)  # the one registry
    assert len(stages) >= 8
    for stage in stages:
        assert re.search(rf"^\s+{stage}\s", res.stdout, re.M), stage
    assert "python -m paddle.distributed.launch" in res.stdout


def test_convert_checkpoint_help_lists_every_subcommand() -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    res = _run(str(REPO / "tools/convert_checkpoint.py"), "--help")
    for name in convert_checkpoint.SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s+--", res.stdout, re.M), name  # a usage line in the description


def test_generate_help_names_the_files_it_writes() -> None:
    res = _run(str(REPO / "tools/generate.py"), "--help")
    for name in ("{id}.png", "{id}_{k}.png", "{id}.txt", "samples.jsonl", "--prompts", "--keep-rows"):
        assert name in res.stdout, name
    assert "{text}_{candidate}" not in res.stdout
