"""Safe weight files: safetensors in and out.

safetensors is a JSON header plus raw little-endian bytes: reading one never runs code, unlike a
pickle (`.pdparams`, `.pdopt`, `.pt`). This module converts the weights of a checkpoint folder to
safetensors and back, bit for bit, for every dtype a model here uses (float32; float16 / bfloat16
under AMP O2; integer and bool buffers):

    checkpoint_to_safetensors(ckpt, out)            out = FILE.safetensors or a folder
    checkpoint_from_safetensors(src, out, config)   src = FILE.safetensors or such a folder

A `.safetensors` file written here carries the resolved config (YAML) and meta.json in its text
metadata, so it converts back without a config file. The folder form also keeps the checkpoint's
text files (config.yaml, meta.json, vocab.txt, vilg.json ...) and converts checkpoint sub-folders
(a vilg checkpoint's `image_tokenizer/`) the same way. Optimizer and trainer state are not
exported: safetensors is the format for sharing weights; resume from the original folder.

Pickles (`.pdparams` from outside the project) are read through `ernie_vilg.safe_pickle.safe_load`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ernie_vilg.config import Config, ConfigError, load_config
from ernie_vilg.safe_pickle import safe_load

FORMAT = "ernie-vilg-checkpoint"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".pdparams", ".pdopt", ".pd", ".pdmodel", ".pkl", ".pt", ".pth", ".bin", ".ckpt")


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


# --------------------------------------------------------------------------------------------
# whole checkpoints
# --------------------------------------------------------------------------------------------
def _build_vq(cfg: Config) -> Any:
    from ernie_vilg.vq.registry import build_tokenizer

    return build_tokenizer(cfg.VQ)


def _build_vilg(cfg: Config) -> Any:
    from ernie_vilg.models.transformer import ErnieViLG, check_model_config

    try:
        check_model_config(cfg.Model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ErnieViLG(cfg.Model)


# Global.stage -> the bare model of that stage, built from the config alone (no data needed).
MODEL_BUILDERS: dict[str, Callable[[Config], Any]] = {"vq": _build_vq, "vilg": _build_vilg}


def build_model_for(cfg: Config) -> Any:
    try:
        builder = MODEL_BUILDERS[cfg.Global.stage]
    except KeyError:
        raise ConfigError(f"Global.stage: no model builder for stage {cfg.Global.stage!r} "
                          f"(known: {', '.join(MODEL_BUILDERS)})") from None
    return builder(cfg)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_pickle(path: Path) -> bool:
    return path.suffix in PICKLE_SUFFIXES


def checkpoint_to_safetensors(ckpt: str | Path, out: str | Path) -> Path:
    """Export a checkpoint's weights: `out` ending in .safetensors -> one file (config and meta in
    its metadata); otherwise a folder with model.safetensors, the text files and converted
    sub-checkpoints. The checkpoint's pickles are read through `safe_pickle.safe_load`."""
    from ernie_vilg.checkpoint_io import resolve_checkpoint

    src = resolve_checkpoint(ckpt)
    out = Path(out)
    state = safe_load(src / "model.pdparams")
    metadata = {"format": FORMAT, "config": (src / "config.yaml").read_text(encoding="utf-8"),
                "meta": (src / "meta.json").read_text(encoding="utf-8")}
    if out.suffix == ".safetensors":
        return save_safetensors(state, out, metadata)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_safetensors(state, tmp / WEIGHTS_FILE, metadata)
    for item in sorted(src.iterdir()):
        if item.is_file() and not _is_pickle(item):
            shutil.copyfile(item, tmp / item.name)
        elif item.is_dir() and (item / "model.pdparams").is_file():
            checkpoint_to_safetensors(item, tmp / item.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _config_of(src: Path, metadata: dict[str, str], config: Optional[str | Path]) -> Config:
    if config is not None:
        return load_config(config)
    if (src.parent / "config.yaml").is_file() and src.name == WEIGHTS_FILE:
        return load_config(src.parent / "config.yaml")
    if "config" in metadata:
        from ernie_vilg.config import build_config, safe_yaml_load

        try:  # size- and alias-limited: the metadata comes from whoever wrote the file
            data = safe_yaml_load(metadata["config"], f"{src} (metadata)") or {}
        except ConfigError as exc:
            raise SafetensorsError(str(exc)) from None
        if not isinstance(data, dict):
            raise SafetensorsError(f"{src}: the config in its metadata is not a mapping of sections")
        return build_config(data, f"{src} (metadata)")
    raise SafetensorsError(f"{src}: no config in the file's metadata; pass --config")


def _dtype_kind(dtype: Any) -> str:
    name = str(dtype).replace("paddle.", "")
    return "float" if name in ("float16", "bfloat16", "float32", "float64") else name


def _check_dtype_kinds(state: dict[str, Any], own: dict[str, Any], src: Path) -> None:
    """Each tensor's dtype must be the model's, up to float precision (AMP O2 weights are float16 /
    bfloat16): an F32 tensor labelled I32 would import, then break the first load of the result."""
    for key, value in state.items():
        if key in own and _dtype_kind(value.dtype) != _dtype_kind(own[key].dtype):
            raise SafetensorsError(f"{src}: tensor {key} is stored as {str(value.dtype).replace('paddle.', '')}, "
                                   f"the model's is {str(own[key].dtype).replace('paddle.', '')}")


def checkpoint_from_safetensors(src: str | Path, out: str | Path, config: Optional[str | Path] = None) -> Path:
    """A checkpoint folder `out` (model.pdparams, config.yaml, meta.json, text extras) from a
    .safetensors file or a folder written by `checkpoint_to_safetensors`.

    The weights are checked strictly against the model the config builds (every name present,
    none unexpected, shapes equal; CheckpointError names the key) and saved with their dtypes
    unchanged, so a round trip is bit-exact."""
    from ernie_vilg.checkpoint_io import begin_checkpoint, commit_checkpoint, set_model_state

    src, out = Path(src), Path(out)
    folder: Optional[Path] = None
    if src.is_dir():
        folder, src = src, src / WEIGHTS_FILE
    state, metadata = load_safetensors(src)
    cfg = _config_of(src, metadata, config)
    model = build_model_for(cfg)
    own = model.state_dict()
    # strict names and shapes (CheckpointError names the key); a copy cast to the model's dtypes is
    # what gets checked, the saved tensors keep theirs (AMP O2 weights stay float16 / bfloat16)
    _check_dtype_kinds(state, own, src)
    probe = {k: v.astype(own[k].dtype) if k in own and v.dtype != own[k].dtype else v for k, v in state.items()}
    set_model_state(model, probe, src)
    state = {key: state[key] for key in model.state_dict()}  # the model's order (files sort by dtype)
    try:
        old_meta = json.loads(metadata.get("meta", "{}"))
    except ValueError:
        old_meta = {}
    step = int(old_meta.get("step", 0)) if isinstance(old_meta, dict) else 0
    meta = {**(old_meta if isinstance(old_meta, dict) else {}), "step": step,
            "produced_by": "tools/convert_checkpoint.py from-safetensors", "converted_from": str(src),
            "source_sha256": _sha256(src)}
    meta.pop("time", None)

    def extras(tmp: Path) -> None:
        if folder is None:
            return
        for item in sorted(folder.iterdir()):
            if item.name in (WEIGHTS_FILE, "config.yaml", "meta.json"):
                continue
            if item.is_file() and not _is_pickle(item) and ".tmp-" not in item.name:
                shutil.copyfile(item, tmp / item.name)
            elif item.is_dir() and (item / WEIGHTS_FILE).is_file():
                checkpoint_from_safetensors(item, tmp / item.name)

    tmp, final = begin_checkpoint(out.parent, step, name=out.name)
    return commit_checkpoint(tmp, final, step, cfg, state, meta=meta, extras=extras)


def describe_file(path: str | Path) -> list[dict[str, Any]]:
    """Name, dtype and shape of every tensor in a .safetensors, PyTorch zip or Paddle weight file
    (pickles only through the restricted unpicklers)."""
    from ernie_vilg.convert.torch_pickle import flatten_state, load_torch_zip

    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path}: file not found")
    with path.open("rb") as fh:
        head = fh.read(4)
    if path.suffix == ".safetensors":
        raw, _ = read_safetensors(path)
        return [{"name": k, "dtype": d, "shape": s} for k, (d, s, _) in raw.items()]
    if head.startswith(b"PK"):  # a zip: torch.save's format
        tensors = flatten_state(load_torch_zip(path))
        return [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()]
    state = safe_load(path)
    rows = []
    for k, v in (state.items() if isinstance(state, dict) else []):
        if hasattr(v, "shape"):
            rows.append({"name": k, "dtype": str(v.dtype).replace("paddle.", ""), "shape": list(v.shape)})
    return rows
