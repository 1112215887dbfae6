"""The restricted PyTorch checkpoint reader: real zip layout built by hand, no torch needed."""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ernie_vilg.convert.torch_pickle import (
    CheckpointFormatError,
    TorchScriptObject,
    load_state_dict,
    load_torch_zip,
    script_attributes,
)
from ernie_vilg.safe_pickle import UnsafePickleError


# ----------------------------------------------------------------------------- a tiny pickle writer
# Emits protocol-2 opcodes directly, so the test can name torch globals without torch installed.


class Global:
    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Call:  # GLOBAL + args tuple + REDUCE
    def __init__(self, func: Global, *args) -> None:
        self.func, self.args = func, args


class Obj:  # GLOBAL + NEWOBJ + state dict + BUILD (how TorchScript pickles modules)
    def __init__(self, cls: Global, state: dict) -> None:
        self.cls, self.state = cls, state


class Tensor:
    def __init__(self, storage: str, key: str, numel: int, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.key, self.numel = storage, key, numel
        self.offset, self.size, self.stride = offset, size, stride


def _emit(obj, out: io.BytesIO) -> None:
    w = out.write
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
    elif isinstance(obj, tuple):
        w(b"(")
        for x in obj:
            _emit(x, out)
        w(b"t")
    elif isinstance(obj, list):
        w(b"](")
        for x in obj:
            _emit(x, out)
        w(b"e")
    elif isinstance(obj, collections.OrderedDict):
        _emit(Global("collections", "OrderedDict"), out)
        w(b")R(")
        for k, v in obj.items():
            _emit(k, out)
            _emit(v, out)
        w(b"u")
    elif isinstance(obj, dict):
        w(b"}(")
        for k, v in obj.items():
            _emit(k, out)
            _emit(v, out)
        w(b"u")
    elif isinstance(obj, Call):
        _emit(obj.func, out)
        _emit(tuple(obj.args), out)
        w(b"R")
    elif isinstance(obj, Obj):
        _emit(obj.cls, out)
        w(b")\x81")
        _emit(obj.state, out)
        w(b"b")
    elif isinstance(obj, Tensor):
        _emit(Global("torch._utils", "_rebuild_tensor_v2"), out)
        w(b"(")
        _emit(("storage", Global("torch", obj.storage), obj.key, "cpu", obj.numel), out)
        w(b"Q")
        for x in (obj.offset, obj.size, obj.stride, False, collections.OrderedDict()):
            _emit(x, out)
        w(b"tR")
    else:
        raise TypeError(type(obj))


def dumps(obj) -> bytes:
    out = io.BytesIO()
    out.write(b"\x80\x02")
    _emit(obj, out)
    out.write(b".")
    return out.getvalue()


def write_zip(path: Path, pkl: bytes, storages: dict[str, bytes], archive: str = "archive") -> Path:
    # Same layout as torch.save: <archive>/data.pkl, <archive>/data/<key>, version, byteorder.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", pkl)
        zf.writestr(f"{archive}/byteorder", "little")
        for key, raw in storages.items():
            zf.writestr(f"{archive}/data/{key}", raw)
        zf.writestr(f"{archive}/version", "3\n")
    return path


def bf16_bytes(x: np.ndarray) -> bytes:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


# ----------------------------------------------------------------------------- reading


def test_state_dict_with_every_storage_type_and_views(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    h = np.array([0.5, -1.25, 3.0], dtype=np.float16)
    b = np.array([1.0, -2.5, 0.15625], dtype=np.float32)  # exactly representable in bfloat16
    ids = np.array([2**40, -3, 7], dtype=np.int64)
    counts = np.array([1, 2, 3, 4], dtype=np.int32)
    d = np.array([1e-300, 2.0], dtype=np.float64)
    mask = np.array([True, False, True])
    sd = collections.OrderedDict([
        ("w", Tensor("FloatStorage", "0", 6, 0, (2, 3), (3, 1))),
        ("w_t", Tensor("FloatStorage", "0", 6, 0, (3, 2), (1, 3))),  # transposed view, shared storage
        ("row1", Tensor("FloatStorage", "0", 6, 3, (3,), (1,))),  # storage offset
        ("h", Tensor("HalfStorage", "1", 3, 0, (3,), (1,))),
        ("b", Tensor("BFloat16Storage", "2", 3, 0, (3,), (1,))),
        ("ids", Tensor("LongStorage", "3", 3, 0, (3,), (1,))),
        ("counts", Tensor("IntStorage", "4", 4, 0, (2, 2), (2, 1))),
        ("d", Tensor("DoubleStorage", "5", 2, 0, (2,), (1,))),
        ("mask", Tensor("BoolStorage", "6", 3, 0, (3,), (1,))),
        ("scalar", Tensor("FloatStorage", "0", 6, 5, (), ())),
    ])
    path = write_zip(tmp_path / "ckpt.pt", dumps(sd), {
        "0": w.astype("<f4").tobytes(), "1": h.astype("<f2").tobytes(), "2": bf16_bytes(b),
        "3": ids.astype("<i8").tobytes(), "4": counts.astype("<i4").tobytes(), "5": d.astype("<f8").tobytes(),
        "6": mask.tobytes()})
    got = load_state_dict(path)
    assert list(got) == list(sd)
    np.testing.assert_array_equal(got["w"], w)
    np.testing.assert_array_equal(got["w_t"], w.T)
    np.testing.assert_array_equal(got["row1"], w[1])
    assert got["h"].dtype == np.float16 and np.array_equal(got["h"], h)
    assert got["b"].dtype == np.float32 and np.array_equal(got["b"], b)
    assert got["ids"].dtype == np.int64 and got["ids"][0] == 2**40
    np.testing.assert_array_equal(got["counts"], counts.reshape(2, 2))
    np.testing.assert_array_equal(got["d"], d)
    np.testing.assert_array_equal(got["mask"], mask)
    assert got["scalar"].shape == () and got["scalar"] == w.flat[5]


def test_nested_checkpoint_and_key_selection(tmp_path):
    obj = {"epoch": 3, "state_dict": collections.OrderedDict([("layer.weight", Tensor("FloatStorage", "0", 2, 0, (2,), (1,)))]),
           "optimizer": {"lr": 0.5}}
    path = write_zip(tmp_path / "c.pt", dumps(obj), {"0": np.array([1, 2], "<f4").tobytes()})
    raw = load_torch_zip(path)
    assert raw["epoch"] == 3 and raw["optimizer"] == {"lr": 0.5}
    assert list(load_state_dict(path, key="state_dict")) == ["layer.weight"]
    assert list(load_state_dict(path)) == ["state_dict.layer.weight"]
    with pytest.raises(CheckpointFormatError, match="no top-level key 'model'"):
        load_state_dict(path, key="model")


def test_torchscript_modules_become_inert_objects_with_attributes(tmp_path):
    conv = Obj(Global("__torch__.net", "Conv"), {
        "training": False, "stride": 2, "padding": Call(Global("torch.jit._pickle", "build_intlist"), [0, 3]),
        "weight": Tensor("FloatStorage", "0", 4, 0, (1, 1, 2, 2), (4, 4, 2, 1))})
    root = Obj(Global("__torch__.wrap", "WrapNet"), {"training": False, "net": Obj(
        Global("__torch__.net", "Net"), {"training": False, "layers": conv})})
    path = write_zip(tmp_path / "script.pt", dumps(root), {"0": np.arange(4, dtype="<f4").tobytes()},
                     archive="out_jit_module")
    obj = load_torch_zip(path)
    assert isinstance(obj, TorchScriptObject) and obj.qualname == "__torch__.wrap.WrapNet"
    sd = load_state_dict(path)
    assert list(sd) == ["net.layers.weight"] and sd["net.layers.weight"].shape == (1, 1, 2, 2)
    attrs = script_attributes(obj)
    assert attrs["net.layers.stride"] == 2 and attrs["net.layers.padding"] == [0, 3]


# ----------------------------------------------------------------------------- refusing


@pytest.mark.parametrize("module, name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                          ("subprocess", "Popen"), ("torch", "load"), ("numpy", "load")])
def test_globals_outside_the_allow_list_are_refused(tmp_path, module, name, monkeypatch):
    called = []
    monkeypatch.setattr("os.system", lambda *a: called.append(a))
    payload = dumps({"x": Call(Global(module, name), "echo pwned > /tmp/pwned")})
    path = write_zip(tmp_path / "evil.pt", payload, {})
    with pytest.raises(UnsafePickleError, match=f"refusing global '{module}.{name}'"):
        load_torch_zip(path)
    assert called == []


def test_malicious_pickle_built_by_the_stdlib_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("__import__('os').system('echo pwned')",))

    path = write_zip(tmp_path / "evil.pt", pickle.dumps({"w": Evil()}, protocol=4), {})
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_torch_zip(path)


def test_unknown_persistent_id_and_fake_storage_type_are_refused(tmp_path):
    bad_pid = b"\x80\x02(X\x03\x00\x00\x00fooX\x01\x00\x00\x000tQ."
    with pytest.raises(UnsafePickleError, match="unsupported persistent id"):
        load_torch_zip(write_zip(tmp_path / "a.pt", bad_pid, {}))
    fake = b"\x80\x02(X\x07\x00\x00\x00storageX\x01\x00\x00\x00xX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ."
    with pytest.raises(UnsafePickleError, match="not a torch storage"):
        load_torch_zip(write_zip(tmp_path / "b.pt", fake, {}))


def test_inconsistent_checkpoints_raise_clear_errors(tmp_path):
    too_far = dumps({"w": Tensor("FloatStorage", "0", 4, 2, (2, 2), (2, 1))})
    with pytest.raises(CheckpointFormatError, match="reaches past its storage of 4 elements"):
        load_torch_zip(write_zip(tmp_path / "a.pt", too_far, {"0": bytes(16)}))
    missing = dumps({"w": Tensor("FloatStorage", "7", 4, 0, (4,), (1,))})
    with pytest.raises(CheckpointFormatError, match="storage 'archive/data/7' is missing"):
        load_torch_zip(write_zip(tmp_path / "b.pt", missing, {}))
    short = dumps({"w": Tensor("FloatStorage", "0", 4, 0, (4,), (1,))})
    with pytest.raises(CheckpointFormatError, match="has 8 bytes, expected 4 x 4"):
        load_torch_zip(write_zip(tmp_path / "c.pt", short, {"0": bytes(8)}))
    (tmp_path / "legacy.pt").write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")
    with pytest.raises(CheckpointFormatError, match="not a zip file"):
        load_torch_zip(tmp_path / "legacy.pt")
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as zf:
        zf.writestr("x/weights.bin", b"")
    with pytest.raises(CheckpointFormatError, match="no '<archive>/data.pkl'"):
        load_torch_zip(tmp_path / "nopkl.pt")


# ----------------------------------------------------------------------------- against real torch


def test_reads_real_torch_save_files_identically(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    sd = collections.OrderedDict([
        ("f32", base), ("t", base.t()), ("slice", base[1:, 2:]), ("f16", base.half()),
        ("bf16", base.bfloat16()), ("i64", torch.arange(7)), ("i32", torch.arange(3, dtype=torch.int32)),
        ("bool", base > 0), ("param", torch.nn.Parameter(torch.ones(2, 2))),
    ])
    path = tmp_path / "real.pt"
    torch.save({"model": sd, "step": 11}, path)
    got = load_state_dict(path, key="model")
    assert list(got) == list(sd)
    for k, v in sd.items():
        ref = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        np.testing.assert_array_equal(got[k], ref, err_msg=k)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1)))
    torch.jit.save(scripted, str(tmp_path / "s.pt"))
    sd2 = load_state_dict(tmp_path / "s.pt")
    np.testing.assert_array_equal(sd2["0.weight"], scripted[0].weight.detach().numpy())
    np.testing.assert_array_equal(sd2["0.bias"], scripted[0].bias.detach().numpy())
