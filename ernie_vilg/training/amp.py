"""Mixed precision for the Trainer: the autocast context, loss scaling and skipped-step detection.

float16 uses dynamic loss scaling (GradScaler, wrapped for sharding in `distributed.py`);
bfloat16 has float32's exponent range and runs without a scaler. O2 keeps float32 master
weights in the optimizer (`multi_precision=True`). On CPU the `Distributed` validation refuses
any AMP request, because Paddle would silently run float32 there.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import paddle

from ernie_vilg.config import DistributedConfig


def enabled(d: DistributedConfig) -> bool:
    return d.amp_dtype != "float32"


def multi_precision(d: DistributedConfig) -> bool:
    """O2 stores low-precision weights: the optimizer then keeps float32 master copies."""
    return enabled(d) and d.amp_level == "O2"


@contextlib.contextmanager
def autocast(d: DistributedConfig) -> Iterator[None]:
    """Forward-pass context: `paddle.amp.auto_cast` when AMP is on, nothing otherwise."""
    if not enabled(d):
        yield
        return
    with paddle.amp.auto_cast(enable=True, level=d.amp_level, dtype=d.amp_dtype):
        yield


def backward(loss: paddle.Tensor, scaler: Optional[Any]) -> None:
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()


def step(optimizer: Any, scaler: Any) -> bool:
    """Unscale, check for inf/nan, update (or skip) and adjust the scale. Returns True if the
    update was skipped. The sharding-aware scalers agree on `found_inf` across ranks."""
    scaler.step(optimizer)
    skipped = bool(found_inf(scaler))
    scaler.update()
    return skipped


def found_inf(scaler: Any) -> bool:
    # Paddle's AmpScaler records the decision of its last step in _cache_found_inf; wrappers
    # (HybridParallelGradScaler, GroupShardedScaler) delegate attribute access to it
    for obj in (scaler, getattr(scaler, "_scaler", None)):
        if obj is not None and getattr(obj, "_cache_found_inf", None) is not None:
            return bool(obj._cache_found_inf)
    return False


def loss_scale(scaler: Optional[Any]) -> Optional[float]:
    if scaler is None:
        return None
    for obj in (scaler, getattr(scaler, "_scaler", None)):
        scale = getattr(obj, "_scale", None) if obj is not None else None
        if scale is not None:
            return float(scale.numpy().reshape(-1)[0]) if hasattr(scale, "numpy") else float(scale)
    return None
