"""Process-level setup shared by every tool: MKL's CPU code path, CPU threads, logging, seeding."""
from __future__ import annotations

import logging
import os
import random
import sys
from typing import MutableMapping, Optional

import numpy as np

MKL_CPU_TYPE_VAR = "MKL_DEBUG_CPU_TYPE"
STRIDE_KERNEL_VAR = "FLAGS_use_stride_kernel"


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


def contiguous_views_on_cpu(environ: Optional[MutableMapping[str, str]] = None,
                            cpu_build: Optional[bool] = None) -> bool:
    """Turn off Paddle's stride kernels in its CPU build (`FLAGS_use_stride_kernel=0`); True if set.

    With them on (Paddle 3's default), transpose / split / unbind return strided views and the next
    kernel, or its gradient, copies them through a slow generic path: on the shapes training step
    a reshape's backward took 10 ms for 0.5 M floats, and the whole step went from 0.71 s to
    0.44 s on 1 thread with them off (docs/benchmarks.md, "Training step profile"). Off, views are
    materialised contiguously as in Paddle 2.x; no code here relies on a view aliasing its base.
    Paddle reads the flag when it loads, so this runs before `import paddle` (as the MKL rule);
    a value the user set is left alone, and GPU builds (`paddlepaddle-gpu`) are not touched.
    """
    environ = os.environ if environ is None else environ
    if STRIDE_KERNEL_VAR in environ:
        return False
    if cpu_build is None:
        from importlib import metadata

        try:
            metadata.distribution("paddlepaddle")
            cpu_build = True
        except metadata.PackageNotFoundError:
            cpu_build = False
    if not cpu_build:
        return False
    environ[STRIDE_KERNEL_VAR] = "0"
    if "paddle" in sys.modules and environ is os.environ:  # loaded already: set it at run time too
        sys.modules["paddle"].set_flags({STRIDE_KERNEL_VAR: False})
    return True


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                      top_pad: int = 256 << 20) -> bool:
    """Let glibc's malloc reuse freed blocks of any size instead of mapping fresh zeroed pages.

    Paddle's CPU tensors come from malloc; glibc serves blocks above its mmap threshold (128 KiB
    to 32 MiB) with fresh pages that fault in on first touch, so every large activation of a
    training step pays for page faults: a tanh-GELU forward + backward on [16, 128, 512] took
    7.2 ms against 2.7 ms once freed memory is kept in the heap, and the shapes training step
    0.40 s against 0.37 s (1 thread; docs/benchmarks.md, "Training step profile"). The cost is
    that the process keeps its peak heap instead of returning it to the system. Linux / glibc
    only; a no-op (False) elsewhere or when the user set any of glibc's MALLOC_*_ variables.
    """
    if not sys.platform.startswith("linux") or any(v in os.environ for v in MALLOC_ENV_VARS):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit (larger values are refused)
    ok = [mallopt(_M_MMAP_THRESHOLD, mmap_threshold), mallopt(_M_TRIM_THRESHOLD, trim_threshold),
          mallopt(_M_TOP_PAD, top_pad)]
    return all(v == 1 for v in ok)


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


# Import-time notices of libraries that say nothing about the user's job: Paddle's "No ccache
# found" (it would only matter when compiling custom ops) and setuptools' "Setuptools is replacing
# distutils" (paddlenlp imports distutils). Matched by message, so every other warning still shows.
LIBRARY_NOTICES = (r".*No ccache found.*", r".*Setuptools is replacing distutils.*")


def quiet_library_notices() -> None:
    """Hide `LIBRARY_NOTICES` in this process. Called by `import ernie_vilg`, which every tool,
    worker and launched rank does before Paddle loads (PYTHONWARNINGS cannot hold a regex)."""
    import warnings

    # huggingface `datasets` (imported by paddlenlp) logs "PyTorch version X available." at INFO
    # wherever torch is installed; its own switch, read at its import
    os.environ.setdefault("DATASETS_VERBOSITY", "warning")
    if os.environ["DATASETS_VERBOSITY"] == "warning":  # it logs before it reads the switch
        logging.getLogger("datasets").setLevel(logging.WARNING)
    for pattern in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=pattern)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def seed_everything(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


class _NoBar:
    """Stands in for a tqdm bar when progress is off (tests, logs, non-zero ranks)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "it", enable: bool = True) -> "tqdm | _NoBar":  # noqa: F821
    """One progress bar for the long loops of the tools (generation, captioning, VQA, evaluation):
    a tqdm bar on stderr, or a no-op when `enable` is False. tqdm is imported only when used."""
    if not enable:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as set by `paddle.distributed.launch` (1 process otherwise)."""
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    return rank, world
