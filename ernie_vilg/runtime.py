"""Process-level setup shared by every tool: MKL's CPU code path, CPU threads, logging, seeding."""
from __future__ import annotations

import logging
import os
import random
import sys
from typing import MutableMapping, Optional

import numpy as np

MKL_CPU_TYPE_VAR = "MKL_DEBUG_CPU_TYPE"


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read(65536)  # the first processor's block is enough
    except OSError:  # not Linux
        return ""


def mkl_avx2_on_amd(environ: Optional[MutableMapping[str, str]] = None, cpuinfo: Optional[str] = None,
                    paddle_loaded: Optional[bool] = None) -> bool:
    """Make the MKL inside Paddle's CPU wheel use its AVX2 kernels on AMD CPUs; True if it set it.

    That MKL dispatches on the CPU vendor, not on its features: on an AMD CPU with AVX2 it runs
    its generic code path. `MKL_DEBUG_CPU_TYPE=5` selects the AVX2 path (honoured by the MKL
    Paddle 3.3 ships). Measured on the 2-core AMD EPYC dev machine (docs/benchmarks.md,
    "MKL on AMD"): fp32 matmul 2.4-3.4x, a VQA training step 1.7x. MKL reads the variable when
    Paddle loads it, so this must run before `import paddle` (`ernie_vilg/__init__.py` calls it);
    a value the user set is left alone, and Intel CPUs (where it would switch off AVX-512) too.
    """
    environ = os.environ if environ is None else environ
    if MKL_CPU_TYPE_VAR in environ:
        return False
    if paddle_loaded is None:
        paddle_loaded = "paddle" in sys.modules
    if paddle_loaded:  # too late: MKL has read its environment
        return False
    info = _read_cpuinfo() if cpuinfo is None else cpuinfo
    vendor, flags = "", set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    if vendor != "AuthenticAMD" or "avx2" not in flags or "fma" not in flags:
        return False
    environ[MKL_CPU_TYPE_VAR] = "5"
    return True


def configure_threads(num_threads: int = 0) -> int:
    """Let Paddle's CPU kernels use `num_threads` threads (0 = every core).

    Paddle's CPU matmul runs on one thread unless told otherwise; measured here, two threads
    double its rate. Returns the count applied.
    """
    import paddle

    n = num_threads if num_threads > 0 else (os.cpu_count() or 1)
    if not paddle.is_compiled_with_cuda() or paddle.get_device() == "cpu":
        paddle.base.core.set_num_threads(n)
    return n


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def seed_everything(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
