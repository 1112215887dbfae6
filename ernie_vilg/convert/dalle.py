"""OpenAI DALL-E dVAE (`encoder.pkl` + `decoder.pkl`) -> a dVAE tokenizer checkpoint folder.

    python tools/convert_checkpoint.py dalle --encoder encoder.pkl --decoder decoder.pkl \
        --out weights/dalle_dvae [--image-size 256]

The two files are `torch.save` of whole `nn.Module` objects (`dall_e.encoder.Encoder`,
`dall_e.decoder.Decoder`), not state dicts: the pickle stream says "create an object of class
dall_e.encoder.Encoder, then set its __dict__ to {...}", with the parameters inside
`_parameters`, the children inside `_modules`. Loading them the normal way imports `dall_e` and
runs its code. This reader never does:

  * `SkeletonUnpickler` resolves the module classes on an explicit allow-list (the five dall_e
    classes and the torch.nn containers / activations / pooling / upsampling they use) to inert
    `ModuleSkeleton` stand-ins: the pickle's NEWOBJ creates an empty stand-in (object.__new__,
    no __init__), its BUILD stores the attribute dict on it; nothing of dall_e or torch runs.
    `torch.device(...)` becomes its string, `set([...])` a set; tensors come from
    `torch_pickle` (the tensor rebuilders and storage types on its allow-list).
  * Every other global (`os.system`, `builtins.eval`, an unknown class, ...) raises
    `UnsafePickleError` before anything is called.
  * `module_tensors` walks the skeleton tree (`_modules` recursively; `_parameters` and
    `_buffers` at each node) into dotted names, exactly the keys `state_dict()` would give.

The network size comes from the tensors (n_hid from the input conv, groups and blocks from the
module tree, vocab and n_init from the decoder's input conv). Names map one to one onto
`vq/dvae.py` (which keeps DALL-E's `w` / `b`), with prefixes `encoder.` / `decoder.`.
Only the zip format of torch >= 1.6 is read (the legacy tar/raw format is refused with a
message); re-save a legacy file with torch if needed.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ernie_vilg.convert.name_table import (
    ConversionError, Rule, apply_table, tokenizer_target, write_tokenizer_checkpoint,
)
from ernie_vilg.convert.torch_pickle import (
    STORAGE_DTYPES,
    CheckpointFormatError,
    RestrictedUnpickler,
    StorageType,
    _archive_prefix,
    check_zip_size,
    stand_in_class,
)
from ernie_vilg.safe_pickle import UnsafePickleError

# Classes a pickled DALL-E module may instantiate; each becomes an inert ModuleSkeleton.
MODULE_CLASSES: frozenset[tuple[str, str]] = frozenset({
    ("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"),
    ("dall_e.decoder", "Decoder"), ("dall_e.decoder", "DecoderBlock"),
    ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"),
    ("torch.nn.modules.upsampling", "Upsample"),
    ("torch.nn.modules.linear", "Identity"),
})


class ModuleSkeleton:
    """Inert stand-in for a pickled nn.Module: remembers its class name and attribute dict."""

    qualname = "module"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"{self.qualname}: module state is a {type(state).__name__}, not a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"<skeleton {self.qualname}>"


def _skeleton_class(module: str, name: str) -> type:
    return stand_in_class(ModuleSkeleton, module, name)


def _device(*args: Any) -> str:
    """torch.device('cuda', 0) -> 'cuda:0' (only strings / ints accepted)."""
    if not all(isinstance(a, (str, int)) for a in args):
        raise UnsafePickleError(f"torch.device with arguments {args!r:.60}")
    return ":".join(str(a) for a in args)


def _safe_set(items: Any = ()) -> set:
    return set(items)


class SkeletonUnpickler(RestrictedUnpickler):
    """`torch_pickle.RestrictedUnpickler` plus inert stand-ins for the allow-listed module classes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in MODULE_CLASSES:
            return _skeleton_class(module, name)
        if (module, name) == ("torch", "device"):
            return _device
        if (module, name) in (("builtins", "set"), ("__builtin__", "set")):  # protocol 2 spells it __builtin__
            return _safe_set
        return super().find_class(module, name)


def load_module_pickle(path: str | Path) -> ModuleSkeleton:
    """Unpickle a `torch.save(module)` zip file into a ModuleSkeleton tree (tensors as numpy)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(f"{path}: not a zip file (the legacy torch.save format is not read; "
                                    "re-save with torch >= 1.6)")
    with zipfile.ZipFile(path) as zf:
        check_zip_size(zf, path)
        prefix = _archive_prefix(zf, path)
        cache: dict[str, np.ndarray] = {}

        def load_storage(storage_type: StorageType, key: str, numel: int) -> np.ndarray:
            if key not in cache:
                raw_dtype, out_dtype = STORAGE_DTYPES[storage_type.name]
                try:
                    raw = zf.read(f"{prefix}data/{key}")
                except KeyError:
                    raise CheckpointFormatError(f"{path}: storage {key} is missing") from None
                dtype = np.dtype(raw_dtype)
                if len(raw) < numel * dtype.itemsize:
                    raise CheckpointFormatError(f"{path}: storage {key} is truncated")
                arr = np.frombuffer(raw, dtype=dtype, count=numel)
                if storage_type.name == "BFloat16Storage":
                    arr = (arr.astype(np.uint32) << 16).view(np.float32)
                cache[key] = arr.astype(out_dtype, copy=False)
            return cache[key]

        try:
            obj = SkeletonUnpickler(io.BytesIO(zf.read(f"{prefix}data.pkl")), load_storage, f"{path}").load()
        except (UnsafePickleError, CheckpointFormatError):
            raise
        except Exception as exc:  # corrupt pickles raise all kinds of errors
            raise CheckpointFormatError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, ModuleSkeleton):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a pickled module")
    return obj


def module_tensors(node: ModuleSkeleton, prefix: str = "") -> dict[str, np.ndarray]:
    """Dotted name -> array of every parameter and buffer of a skeleton tree (state_dict order)."""
    state = getattr(node, "state", {})
    out: dict[str, np.ndarray] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None:
                out[f"{prefix}{name}"] = np.asarray(value)
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, ModuleSkeleton):
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def _children(node: ModuleSkeleton) -> dict[str, Any]:
    return getattr(node, "state", {}).get("_modules") or {}


def infer_dvae_config(encoder: ModuleSkeleton, decoder: ModuleSkeleton):
    """VQConfig of the pickled pair, read from the module tree and tensor shapes."""
    from ernie_vilg.config import VQConfig

    if encoder.qualname != "dall_e.encoder.Encoder" or decoder.qualname != "dall_e.decoder.Decoder":
        raise ConversionError(f"expected dall_e Encoder / Decoder, got {encoder.qualname} / {decoder.qualname}")
    enc, dec = module_tensors(encoder), module_tensors(decoder)
    try:
        groups = sorted(n for n in _children(_children(encoder)["blocks"]) if n.startswith("group_"))
        blocks = [n for n in _children(_children(_children(encoder)["blocks"])["group_1"]) if n.startswith("block_")]
        n_hid = int(enc["blocks.input.w"].shape[0])
        vocab = int(enc["blocks.output.conv.w"].shape[0])
        n_init = int(dec["blocks.input.w"].shape[0])
    except KeyError as exc:
        raise ConversionError(f"not a DALL-E dVAE module tree: no {exc}") from None
    if int(dec["blocks.input.w"].shape[1]) != vocab:
        raise ConversionError(f"encoder vocab {vocab} != decoder vocab {int(dec['blocks.input.w'].shape[1])}")
    return VQConfig(kind="dvae", in_channels=3, hidden_channels=n_hid, channel_mult=[2 ** g for g in range(len(groups))],
                    num_res_blocks=len(blocks), downsample_factor=2 ** (len(groups) - 1), patch_size=1,
                    codebook_size=vocab, embed_dim=n_init)


# One table per file: names are DALL-E's own, moved under encoder. / decoder.
ENCODER_TABLE = [Rule(r"(blocks\..+\.(w|b))", r"encoder.\1")]
DECODER_TABLE = [Rule(r"(blocks\..+\.(w|b))", r"decoder.\1")]


def convert_dalle(encoder_pkl: str | Path, decoder_pkl: str | Path, out: str | Path, image_size: int = 256) -> Path:
    encoder, decoder = load_module_pickle(encoder_pkl), load_module_pickle(decoder_pkl)
    cfg, model = tokenizer_target("dvae", infer_dvae_config(encoder, decoder), image_size)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    enc_shapes = {k: v for k, v in shapes.items() if k.startswith("encoder.")}
    dec_shapes = {k: v for k, v in shapes.items() if k.startswith("decoder.")}
    state = apply_table(module_tensors(encoder), ENCODER_TABLE, enc_shapes, where=str(encoder_pkl)).state
    state.update(apply_table(module_tensors(decoder), DECODER_TABLE, dec_shapes, where=str(decoder_pkl)).state)
    meta = {"produced_by": "tools/convert_checkpoint.py dalle",
            "converted_from": [str(encoder_pkl), str(decoder_pkl)]}
    return write_tokenizer_checkpoint(out, cfg, model, state, meta)
