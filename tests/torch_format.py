"""Write PyTorch zip checkpoints without torch (for converter tests): protocol-2 opcodes by hand.

`Obj(Global(module, name), state)` pickles like an nn.Module (NEWOBJ + BUILD of its __dict__),
`Param(array)` like an nn.Parameter, `Call(Global, *args)` like any reduce, so a test can write a
state dict (`write_state_dict`) or a whole pickled module tree (`module`) with torch's names.
"""
from __future__ import annotations

import collections
import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


class Global:
    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Call:
    def __init__(self, func: Global, *args: Any) -> None:
        self.func, self.args = func, args


class Obj:
    def __init__(self, cls: Global, state: dict) -> None:
        self.cls, self.state = cls, state


class Param:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array


class _Writer:
    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.storages: dict[str, bytes] = {}

    def tensor(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        key = str(len(self.storages))
        self.storages[key] = arr.astype("<f4").tobytes()
        stride = tuple(s // 4 for s in arr.strides) if arr.ndim else ()
        self.emit(Global("torch._utils", "_rebuild_tensor_v2"))
        self.out.write(b"(")
        self.emit(("storage", Global("torch", "FloatStorage"), key, "cpu", int(arr.size)))
        self.out.write(b"Q")
        for x in (0, tuple(arr.shape), stride, False, collections.OrderedDict()):
            self.emit(x)
        self.out.write(b"tR")

    def emit(self, obj: Any) -> None:
        w = self.out.write
        if obj is None:
            w(b"N")
        elif obj is True or obj is False:
            w(b"\x88" if obj else b"\x89")
        elif isinstance(obj, int):
            w(b"J" + struct.pack("<i", obj))
        elif isinstance(obj, float):
            w(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            w(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(obj, Global):
            w(f"c{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, np.ndarray):
            self.tensor(obj)
        elif isinstance(obj, Param):
            self.emit(Call(Global("torch._utils", "_rebuild_parameter"), obj.array, True, collections.OrderedDict()))
        elif isinstance(obj, tuple):
            w(b"(")
            for x in obj:
                self.emit(x)
            w(b"t")
        elif isinstance(obj, list):
            w(b"](")
            for x in obj:
                self.emit(x)
            w(b"e")
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                self.emit(Global("collections", "OrderedDict"))
                w(b")R(")
            else:
                w(b"}(")
            for k, v in obj.items():
                self.emit(k)
                self.emit(v)
            w(b"u")
        elif isinstance(obj, Call):
            self.emit(obj.func)
            self.emit(tuple(obj.args))
            w(b"R")
        elif isinstance(obj, Obj):
            self.emit(obj.cls)
            w(b")\x81")
            self.emit(obj.state)
            w(b"b")
        else:
            raise TypeError(type(obj))


def write_torch_zip(path: Path, obj: Any) -> Path:
    """`torch.save(obj, path)` look-alike (zip layout: archive/data.pkl + archive/data/<key>)."""
    wr = _Writer()
    wr.out.write(b"\x80\x02")
    wr.emit(obj)
    wr.out.write(b".")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", wr.out.getvalue())
        zf.writestr("archive/byteorder", "little")
        for key, raw in wr.storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")
    return path


def module(qualname: str, params: dict[str, np.ndarray] | None = None, children: dict[str, Any] | None = None,
           **attrs: Any) -> Obj:
    """A pickled nn.Module as torch writes it: class global + __dict__ (hooks, params, children)."""
    mod, name = qualname.rsplit(".", 1)
    empty = collections.OrderedDict
    state = {"training": False, "_parameters": empty((k, Param(v)) for k, v in (params or {}).items()),
             "_buffers": empty(), "_non_persistent_buffers_set": Call(Global("__builtin__", "set"), []),
             "_backward_hooks": empty(), "_forward_hooks": empty(), "_forward_pre_hooks": empty(),
             "_state_dict_hooks": empty(), "_load_state_dict_pre_hooks": empty(),
             "_modules": empty(children or {}), **attrs}
    return Obj(Global(mod, name), state)
