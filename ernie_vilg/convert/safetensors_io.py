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
from typing import Any, Optional


from ernie_vilg.config import Config, ConfigError, load_config
from ernie_vilg.safe_pickle import safe_load
from ernie_vilg.safetensors_file import SafetensorsError, load_safetensors, read_safetensors, save_safetensors

FORMAT = "ernie-vilg-checkpoint"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".pdparams", ".pdopt", ".pd", ".pdmodel", ".pkl", ".pt", ".pth", ".bin", ".ckpt")


# --------------------------------------------------------------------------------------------
# whole checkpoints
# --------------------------------------------------------------------------------------------
def build_model_for(cfg: Config, ckpt_dir: Optional[Path] = None) -> Any:
    """The bare model of stage `cfg.Global.stage` (`ernie_vilg.stages.STAGES`)."""
    from ernie_vilg.stages import build_bare_model

    return build_bare_model(cfg, ckpt_dir)


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
    from ernie_vilg.checkpoint_io import has_weights, is_weight_file, load_model_state, resolve_checkpoint

    src = resolve_checkpoint(ckpt)
    out = Path(out)
    state = load_model_state(src)
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
        if item.is_file() and not _is_pickle(item) and not is_weight_file(item.name):
            shutil.copyfile(item, tmp / item.name)
        elif item.is_dir() and has_weights(item):
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
    model = build_model_for(cfg, folder)
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
