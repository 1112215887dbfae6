"""Run a tool as a user would: its own process, the environment CI has (no PYTHONWARNINGS that
would hide library noise), one thread."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300) -> "subprocess.CompletedProcess[str]":
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stderr_lines(proc: "subprocess.CompletedProcess[str]") -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_line_error(proc: "subprocess.CompletedProcess[str]", *words: str, skipped_lines: int = 0) -> str:
    """Exit code 2 and exactly one non-empty stderr line containing every one of `words`; with
    `skipped_lines`, that many of the project's own "skipping manifest line" warnings before it
    or "skipping <bad image>" (they say which inputs led to the error), and nothing else."""
    lines = stderr_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 + skipped_lines, (proc.returncode, proc.stderr[-3000:])
    assert all("skipping" in line for line in lines[:-1]), proc.stderr[-3000:]
    lines = lines[-1:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
