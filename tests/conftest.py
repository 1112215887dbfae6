import os

# Tests share a 2-core machine; one thread per process keeps them predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Before any test module imports paddle: on AMD CPUs this selects MKL's AVX2 kernels
# (ernie_vilg/runtime.py); subprocesses the tests start inherit the variable.
import ernie_vilg  # noqa: E402,F401

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_quickstart(tmp_path_factory) -> Path:
    """The `--smoke` quickstart's output folder (data, vq/, tokens/, vocab.txt, vilg/, metrics),
    run once per session (about 30 s on one thread) for the tests that use its checkpoints."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smoke_quickstart") / "qs"
    proc = subprocess.run([sys.executable, str(REPO / "tools/quickstart.py"), "--smoke", "--out", str(out),
                           "--threads", "1"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out

