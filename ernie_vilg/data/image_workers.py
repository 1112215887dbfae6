"""Multi-process image decoding for the tokenizer stages (`Data.num_workers`).

Decoding and resizing JPEGs is the CPU cost of an image tokenizer's input pipeline; at 256 x 256
(the paper's VQGAN) one process decodes a few hundred images a second. `ImageWorkers` decodes the
images of one batch in `num_workers` spawned processes (Paddle's runtime is not fork-safe once
initialised, see vq/parallel_tokenize.py) and returns the results in request order, with a failed
image as its error message, so `ImageBatches` skips and counts bad images exactly as it does in
one process: the batches, their order and the resume state do not depend on `num_workers`.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np

# (path, size) -> (image, "") or (None, an error message): a module-level function, so spawned
# workers can import it (data.images.decode_or_error)
Decoder = Callable[[str, int], tuple[Optional[np.ndarray], str]]


class ImageWorkers:
    """A pool of `num_workers` decoding processes, started on first use; `close()` ends them."""

    def __init__(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self._pool: Optional[ProcessPoolExecutor] = None

    def decode(self, decoder: Decoder, paths: Sequence[str], size: int) -> list[tuple[Optional[np.ndarray], str]]:
        """`decoder` over `paths` in parallel; results in the order of `paths`."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
        # chunks of about one per worker: fewer round trips for small images
        chunk = max(1, len(paths) // self.num_workers)
        return list(self._pool.map(decoder, list(paths), [size] * len(paths), chunksize=chunk))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:  # a forgotten pool must not keep the interpreter from exiting
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass
