"""safetensors files of Paddle state dicts: write, read, load, bit for bit for every dtype a model
here uses (float32; float16 / bfloat16 under AMP O2; integer and bool buffers).

safetensors is a JSON header plus raw little-endian bytes: reading one never runs code, unlike a
pickle. Floor 0: numpy and the safetensors package (Paddle only inside the functions), so any
room can read and write weights; whole-checkpoint conversion is `convert.safetensors_io`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np


class SafetensorsError(ValueError):
    """A safetensors file or conversion that cannot be used; the message names the file."""


# Paddle dtype name -> (safetensors dtype name, numpy dtype of the raw bytes). bfloat16 travels
# as its uint16 bit pattern: numpy has no bfloat16, and Paddle reads a uint16 array as bfloat16.
DTYPES: dict[str, tuple[str, str]] = {
    "float32": ("F32", "<f4"),
    "float16": ("F16", "<f2"),
    "bfloat16": ("BF16", "<u2"),
    "float64": ("F64", "<f8"),
    "int64": ("I64", "<i8"),
    "int32": ("I32", "<i4"),
    "int16": ("I16", "<i2"),
    "int8": ("I8", "i1"),
    "uint8": ("U8", "u1"),
    "bool": ("BOOL", "?"),
}
_FROM_ST = {st: (name, raw) for name, (st, raw) in DTYPES.items()}
# numpy dtype name -> paddle dtype name, for state dicts of numpy arrays
_NUMPY_NAMES = {"float32": "float32", "float16": "float16", "float64": "float64", "int64": "int64",
                "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


# --------------------------------------------------------------------------------------------
# tensors <-> safetensors files
# --------------------------------------------------------------------------------------------
def _raw(value: Any, name: str) -> tuple[str, np.ndarray]:
    """(paddle dtype name, C-contiguous little-endian array holding the exact bytes)."""
    import paddle

    if isinstance(value, paddle.Tensor):
        dtype = str(value.dtype).replace("paddle.", "")
        arr = value.numpy()  # bfloat16 -> its uint16 bits
    elif isinstance(value, np.ndarray):
        if value.dtype.name not in _NUMPY_NAMES:
            raise SafetensorsError(f"{name}: numpy dtype {value.dtype} is not supported "
                                   f"(supported: {', '.join(_NUMPY_NAMES)})")
        dtype, arr = _NUMPY_NAMES[value.dtype.name], value
    else:
        raise SafetensorsError(f"{name}: a {type(value).__name__} is not a tensor")
    if dtype not in DTYPES:
        raise SafetensorsError(f"{name}: dtype {dtype} is not supported (supported: {', '.join(DTYPES)})")
    # np.array(order="C"), not ascontiguousarray: the latter turns 0-d arrays into 1-d
    return dtype, np.array(arr, dtype=np.dtype(DTYPES[dtype][1]), order="C")


def save_safetensors(state: dict[str, Any], path: str | Path, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write a flat {name: Tensor or ndarray} dict to `path` (atomically: temporary name, rename)."""
    from safetensors import TensorSpec, serialize_file

    path = Path(path)
    arrays = {name: _raw(value, name) for name, value in state.items()}
    # the specs hold raw pointers: `arrays` keeps every buffer alive until serialize_file returns
    specs = {name: TensorSpec(dtype=np.dtype(DTYPES[dtype][1]).name if dtype != "bfloat16" else "bfloat16",
                              shape=arr.shape, data_ptr=arr.ctypes.data, data_len=arr.nbytes)
             for name, (dtype, arr) in arrays.items()}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    serialize_file(specs, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    """{name: (safetensors dtype, shape, raw bytes)} and the text metadata; header checked by the
    safetensors library (offsets, sizes), no code runs."""
    from safetensors import SafetensorError, deserialize

    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path}: safetensors file not found")
    data = path.read_bytes()
    try:
        items = deserialize(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise SafetensorsError(f"{path}: not a valid safetensors file ({exc})") from None
    header_len = int.from_bytes(data[:8], "little")
    try:
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except ValueError:
        metadata = {}
    return {name: (spec["dtype"], list(spec["shape"]), bytes(spec["data"])) for name, spec in items}, metadata


def load_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Paddle tensors (dtype exactly as stored) and the text metadata of a safetensors file."""
    import paddle

    raw, metadata = read_safetensors(path)
    state: dict[str, Any] = {}
    for name, (st_dtype, shape, data) in raw.items():
        if st_dtype not in _FROM_ST:
            raise SafetensorsError(f"{path}: tensor {name} has dtype {st_dtype}, which Paddle models here "
                                   f"do not use (supported: {', '.join(_FROM_ST)})")
        dtype, raw_dtype = _FROM_ST[st_dtype]
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(raw_dtype).itemsize
        if len(data) != expected:
            raise SafetensorsError(f"{path}: tensor {name} holds {len(data)} bytes, but {st_dtype} {list(shape)} "
                                   f"needs {expected}")
        arr = np.frombuffer(data, dtype=np.dtype(raw_dtype)).reshape(shape)
        # uint16 bits -> bfloat16, others keep their dtype; to_tensor makes 0-d arrays 1-d
        tensor = paddle.to_tensor(arr.reshape([-1]).copy()).reshape(shape)
        if str(tensor.dtype).replace("paddle.", "") != dtype:
            tensor = tensor.astype(dtype)  # e.g. bool / uint8 buffers Paddle widened
        state[name] = tensor
    return state, metadata
