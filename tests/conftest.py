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
