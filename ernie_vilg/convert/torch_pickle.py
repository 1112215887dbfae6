"""Read PyTorch zip checkpoints (``torch.save`` and TorchScript archives) without importing torch.

A PyTorch zip checkpoint is ``<archive>/data.pkl`` (a pickle) plus one raw little-endian file per
storage, ``<archive>/data/<key>``. The pickle refers to storages through persistent ids
``('storage', <torch.XStorage>, key, location, numel)`` and rebuilds tensors with
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``. TorchScript archives
(``torch.jit.save``) use the same layout; their modules are pickled as ``__torch__.<module>.<Class>``
objects whose attributes (parameters, sub-modules, ints) come in a BUILD state dict, and tensor
constants live in ``constants.pkl`` + ``constants/<key>``.

Unpickling runs code chosen by the file, so `RestrictedUnpickler` resolves only the globals on an
allow-list (tensor rebuilders, storage types, OrderedDict, TorchScript list builders) and turns
every ``__torch__.*`` class into an inert `TorchScriptObject`; any other global (``os.system``,
``builtins.eval``, ...) raises `UnsafePickleError`. Tensors come back as numpy arrays (bfloat16 is
widened to float32, since numpy has no bfloat16).
"""
from __future__ import annotations

import collections
import io
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ernie_vilg.safe_pickle import AllowListUnpickler, UnsafePickleError


class CheckpointFormatError(ValueError):
    """Not a readable PyTorch zip checkpoint (or an inconsistent one)."""


# Storage type name -> (numpy dtype of the raw bytes, dtype of the returned array).
STORAGE_DTYPES: dict[str, tuple[str, str]] = {
    "FloatStorage": ("<f4", "float32"),
    "DoubleStorage": ("<f8", "float64"),
    "HalfStorage": ("<f2", "float16"),
    "BFloat16Storage": ("<u2", "float32"),  # widened: numpy has no bfloat16
    "LongStorage": ("<i8", "int64"),
    "IntStorage": ("<i4", "int32"),
    "ShortStorage": ("<i2", "int16"),
    "CharStorage": ("i1", "int8"),
    "ByteStorage": ("u1", "uint8"),
    "BoolStorage": ("?", "bool"),
}


class StorageType:
    """Stand-in for ``torch.XStorage``: only its name is used."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class TorchScriptObject:
    """An inert stand-in for a pickled ``__torch__.*`` object (a scripted module or class)."""

    qualname = "__torch__"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


_STAND_INS: dict[tuple[type, str], type] = {}


def stand_in_class(base: type, module: str, name: str) -> type:
    """One inert subclass of `base` per pickled class name (its `qualname`), made once: pickles
    get a class to instantiate that stores state and runs nothing."""
    qualname = f"{module}.{name}"
    if (base, qualname) not in _STAND_INS:
        _STAND_INS[(base, qualname)] = type(name, (base,), {"qualname": qualname})
    return _STAND_INS[(base, qualname)]


def _script_class(module: str, name: str) -> type:
    return stand_in_class(TorchScriptObject, module, name)


def _rebuild_tensor_v2(storage: np.ndarray, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool = False, backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    if not isinstance(storage, np.ndarray):
        raise CheckpointFormatError(f"tensor storage is a {type(storage).__name__}, not a loaded storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise CheckpointFormatError(f"bad tensor geometry: offset {storage_offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointFormatError(f"tensor (offset {storage_offset}, size {size}, stride {stride}) "
                                    f"reaches past its storage of {storage.size} elements")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, order="C")  # a copy; (ascontiguousarray would turn 0-d into 1-d)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None,
                       state: Any = None) -> np.ndarray:
    return data


def _as_list(items: Any) -> list:
    return list(items)


# (module, name) -> what the unpickler hands back. Nothing here can run arbitrary code.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
    ("torch", "Size"): tuple,
    **{("torch", name): StorageType for name in STORAGE_DTYPES},  # a fresh instance per lookup
}


class RestrictedUnpickler(AllowListUnpickler):
    """`ALLOWED_GLOBALS` (plus inert ``__torch__.*`` classes); storages through `load_storage`."""

    allowed = ALLOWED_GLOBALS
    what = "torch_pickle (tensors, storages, OrderedDict, TorchScript objects)"

    def __init__(self, file: io.BufferedIOBase, load_storage: Callable[[StorageType, str, int], np.ndarray],
                 source: str = "pickle") -> None:
        super().__init__(file, source)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        # Never hand out a shared mutable object: a BUILD opcode could alter it for later loads.
        return StorageType(name) if found is StorageType else found

    def resolve_other(self, module: str, name: str) -> Any:
        if (module == "__torch__" or module.startswith("__torch__.")) and name.isidentifier():
            return _script_class(module, name)
        return super().resolve_other(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            return super().persistent_load(pid)
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise self.refuse(f"storage type {storage_type!r:.60} is not a torch storage")
        return self._load_storage(storage_type, str(key), int(numel))


# torch.save stores its members uncompressed, so a real checkpoint unpacks to about its own size.
# A zip bomb (4 MB that inflates to 8.4 GB) is refused before any member is read.
ZIP_MAX_EXPANSION = 16  # total uncompressed bytes <= this x the archive's size ...
ZIP_MIN_ALLOWANCE = 64 << 20  # ... or this, whichever is larger (small archives)


def check_zip_size(zf: zipfile.ZipFile, path: Path) -> None:
    """CheckpointFormatError if the members' declared total uncompressed size exceeds the limit.
    The declared sizes bind: zipfile stops reading a member at its declared size (and checks CRC)."""
    archive = path.stat().st_size
    total = sum(info.file_size for info in zf.infolist())
    limit = max(ZIP_MAX_EXPANSION * archive, ZIP_MIN_ALLOWANCE)
    if total > limit:
        raise CheckpointFormatError(f"{path}: members unpack to {total} bytes from a {archive}-byte archive "
                                    f"(limit {limit}): refusing a possible zip bomb")


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkls:
        raise CheckpointFormatError(f"{path}: no '<archive>/data.pkl' inside; not a PyTorch zip checkpoint")
    return pkls[0][: -len("data.pkl")]


def _unpickle(zf: zipfile.ZipFile, path: Path, prefix: str, pkl: str, storage_dir: str) -> Any:
    byteorder = "little"
    if f"{prefix}byteorder" in zf.namelist():
        byteorder = zf.read(f"{prefix}byteorder").decode().strip()
    cache: dict[str, np.ndarray] = {}

    def load_storage(storage_type: StorageType, key: str, numel: int) -> np.ndarray:
        if key not in cache:
            raw_dtype, out_dtype = STORAGE_DTYPES[storage_type.name]
            member = f"{prefix}{storage_dir}/{key}"
            try:
                raw = zf.read(member)
            except KeyError:
                raise CheckpointFormatError(f"{path}: storage '{member}' is missing") from None
            dtype = np.dtype(raw_dtype)
            if byteorder == "big":
                dtype = dtype.newbyteorder(">")
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointFormatError(f"{path}: storage '{member}' has {len(raw)} bytes, "
                                            f"expected {numel} x {dtype.itemsize}")
            arr = np.frombuffer(raw, dtype=dtype, count=numel)
            if storage_type.name == "BFloat16Storage":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            cache[key] = arr.astype(out_dtype, copy=False)
        return cache[key]

    source = f"{path}:{prefix}{pkl}"
    with zf.open(f"{prefix}{pkl}") as fh:
        try:
            return RestrictedUnpickler(io.BytesIO(fh.read()), load_storage, source).load()
        except (UnsafePickleError, CheckpointFormatError):
            raise
        except Exception as exc:  # corrupt pickles raise all kinds of errors
            raise CheckpointFormatError(f"{source}: cannot unpickle ({type(exc).__name__}: {exc})") from None


def load_torch_zip(path: str | Path) -> Any:
    """Unpickle ``data.pkl`` of a PyTorch zip checkpoint; tensors become numpy arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(f"{path}: not a zip file (legacy torch.save format is not supported; "
                                    "re-save it with torch>=1.6 or export safetensors)")
    with zipfile.ZipFile(path) as zf:
        check_zip_size(zf, path)
        prefix = _archive_prefix(zf, path)
        return _unpickle(zf, path, prefix, "data.pkl", "data")


def flatten_state(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Dotted names -> arrays of every tensor in nested dicts / TorchScript modules / lists."""
    out: dict[str, np.ndarray] = {}
    if isinstance(obj, np.ndarray):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, TorchScriptObject):
        out.update(flatten_state(getattr(obj, "state", {}), prefix))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_state(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten_state(v, f"{prefix}{i}."))
    return out


def script_attributes(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted names -> non-tensor attributes (ints, lists, bools) of a TorchScript module tree."""
    out: dict[str, Any] = {}
    state = getattr(obj, "state", None) if isinstance(obj, TorchScriptObject) else None
    if isinstance(state, dict):
        for k, v in state.items():
            if isinstance(v, TorchScriptObject):
                out.update(script_attributes(v, f"{prefix}{k}."))
            elif not isinstance(v, np.ndarray):
                out[f"{prefix}{k}"] = v
    return out


def load_state_dict(path: str | Path, key: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as a flat ``name -> array`` dict.

    Works for ``torch.save(state_dict)``, checkpoints nesting it (pass ``key``, e.g. "state_dict")
    and TorchScript archives (names follow the module tree, e.g. ``net.layers.conv.weight``).
    """
    obj = load_torch_zip(path)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise CheckpointFormatError(f"{path}: no top-level key {key!r}")
        obj = obj[key]
    tensors = flatten_state(obj)
    if not tensors:
        raise CheckpointFormatError(f"{path}: no tensors found")
    return tensors
