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
    # asarray(order="C"), not ascontiguousarray (which turns 0-d arrays into 1-d): no copy when
    # the array already has the bytes' layout, so a tensor costs one host copy (its .numpy())
    return dtype, np.asarray(arr, dtype=np.dtype(DTYPES[dtype][1]), order="C")


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


# --------------------------------------------------------------------------------------------
# streaming: one tensor in host memory at a time
# --------------------------------------------------------------------------------------------
HEADER_LIMIT = 100 << 20  # a header larger than this is not a weight file (a hostile length field)


def tensor_spec(value: Any, name: str) -> tuple[str, list[int]]:
    """(paddle dtype name, shape) without copying the data."""
    import paddle

    if isinstance(value, paddle.Tensor):
        dtype, shape = str(value.dtype).replace("paddle.", ""), [int(d) for d in value.shape]
    elif isinstance(value, np.ndarray):
        if value.dtype.name not in _NUMPY_NAMES:
            raise SafetensorsError(f"{name}: numpy dtype {value.dtype} is not supported "
                                   f"(supported: {', '.join(_NUMPY_NAMES)})")
        dtype, shape = _NUMPY_NAMES[value.dtype.name], list(value.shape)
    else:
        raise SafetensorsError(f"{name}: a {type(value).__name__} is not a tensor")
    if dtype not in DTYPES:
        raise SafetensorsError(f"{name}: dtype {dtype} is not supported (supported: {', '.join(DTYPES)})")
    return dtype, shape


def write_safetensors_streaming(state: dict[str, Any], path: str | Path,
                                metadata: Optional[dict[str, str]] = None) -> int:
    """Write `state` ({name: Tensor or ndarray}) as a safetensors file, copying one tensor at a
    time to host memory: the header comes from shapes and dtypes alone, then each tensor's bytes
    are written and dropped. Atomic (temporary name, fsync, rename). Returns the bytes of data.

    The layout is the safetensors format (an 8-byte little-endian header length, the JSON header
    with each tensor's dtype, shape and [begin, end) data offsets, then the raw little-endian
    bytes), so `safetensors` and `read_safetensors` read it."""
    path = Path(path)
    header: dict[str, Any] = {}
    offset = 0
    specs = {}
    for name, value in state.items():
        dtype, shape = tensor_spec(value, name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][1]).itemsize
        header[name] = {"dtype": DTYPES[dtype][0], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        specs[name] = (dtype, nbytes)
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the library writes it
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for name, value in state.items():
            dtype, arr = _raw(value, name)  # the one host copy alive at a time
            if arr.nbytes != specs[name][1]:
                raise SafetensorsError(f"{name}: changed size while being written")
            if arr.size:
                fh.write(memoryview(arr.reshape(-1)).cast("B"))  # the array's own buffer: no second copy
            del arr
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return offset


class SafetensorsReader:
    """Lazy reader: the header is checked on open, each tensor is read from disk when asked for
    (`get`), so loading never holds more than the tensors the caller keeps. No code runs.

        with SafetensorsReader(path) as r:
            for name in r.keys():
                tensor = r.get(name)          # paddle.Tensor, dtype as stored
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SafetensorsError(f"{self.path}: safetensors file not found")
        self._fh = self.path.open("rb")
        try:
            self.header, self.metadata, self._data_start = self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _read_header(self) -> tuple[dict[str, Any], dict[str, str], int]:
        size = self.path.stat().st_size
        head = self._fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(HEADER_LIMIT, size - 8):
            raise SafetensorsError(f"{self.path}: not a valid safetensors file (header length {n} of a "
                                   f"{size}-byte file)")
        try:
            header = json.loads(self._fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SafetensorsError(f"{self.path}: not a valid safetensors file (header: {exc})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: not a valid safetensors file (header is not an object)")
        metadata = header.pop("__metadata__", None) or {}
        data_len, spans = size - 8 - n, []
        for name, spec in header.items():
            try:
                dtype, shape, (begin, end) = spec["dtype"], [int(d) for d in spec["shape"]], spec["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name}: malformed header entry") from None
            if dtype not in _FROM_ST:
                raise SafetensorsError(f"{self.path}: tensor {name} has dtype {dtype}, which Paddle models here "
                                       f"do not use (supported: {', '.join(_FROM_ST)})")
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_FROM_ST[dtype][1]).itemsize
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len) \
                    or end - begin != expected or min(shape, default=0) < 0:
                raise SafetensorsError(f"{self.path}: tensor {name}: offsets {[begin, end]} do not hold "
                                       f"{dtype} {shape} within the file's {data_len} data bytes")
            spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise SafetensorsError(f"{self.path}: tensors {n0} and {n1} overlap")
        return header, {str(k): str(v) for k, v in metadata.items()}, 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> list[int]:
        return list(self.header[name]["shape"])

    def get(self, name: str) -> Any:
        """The tensor `name` as a paddle.Tensor with its stored dtype (bfloat16 included)."""
        import paddle

        spec = self.header.get(name)
        if spec is None:
            raise SafetensorsError(f"{self.path}: no tensor {name}")
        dtype, raw_dtype = _FROM_ST[spec["dtype"]]
        begin, end = spec["data_offsets"]
        self._fh.seek(self._data_start + begin)
        flat = np.empty(int(np.prod(spec["shape"], dtype=np.int64)), dtype=np.dtype(raw_dtype))
        if flat.size and self._fh.readinto(memoryview(flat).cast("B")) != end - begin:  # read in place
            raise SafetensorsError(f"{self.path}: tensor {name} is truncated")
        # uint16 bits -> bfloat16, others keep their dtype; to_tensor makes 0-d arrays 1-d
        tensor = paddle.to_tensor(flat).reshape(spec["shape"])
        if str(tensor.dtype).replace("paddle.", "") != dtype:
            tensor = tensor.astype(dtype)
        return tensor

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
