"""Checkpoint folders: atomic save, keep-last-N, find the newest complete one, load.

A checkpoint is a folder that any tool loads with `--ckpt DIR` alone:

    model.pdparams      model weights (state_dict)
    optimizer.pdopt     optimizer state (each rank its shard under sharding)
    trainer_state.pd    step, data position, RNG states, scaler state
    config.yaml         the resolved config
    meta.json           what produced it (written last: its presence marks a complete folder)
    ...                 stage extras (vocab.txt, tokenizer/ ...)

Saving writes everything into `<name>.tmp-<pid>` and renames it to `<name>` at the end, so a
crash mid-save leaves only a temporary folder that loading ignores and the next save removes.
These are the project's own files: `paddle.load` is used on them; never point it at a file
from outside (use `ernie_vilg.convert` readers for those).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import paddle

from ernie_vilg.config import Config, load_saved_config, save_config

STEP_DIR = re.compile(r"^step-(\d+)$")
REQUIRED_FILES = ("model.pdparams", "config.yaml", "meta.json")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the folder and the file."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    cfg: Config,
    model_state: dict[str, Any],
    optimizer_state: Optional[dict[str, Any]] = None,
    trainer_state: Optional[dict[str, Any]] = None,
    meta: Optional[dict[str, Any]] = None,
    extras: Optional[Callable[[Path], None]] = None,
    keep_last: int = 0,
    name: Optional[str] = None,
) -> Path:
    """Write `root/step-XXXXXXXX` (or `root/<name>`) atomically; prune to `keep_last` folders."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"step-{step:08d}")
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    paddle.save(model_state, str(tmp / "model.pdparams"))
    if optimizer_state is not None:
        paddle.save(optimizer_state, str(tmp / "optimizer.pdopt"))
    if trainer_state is not None:
        paddle.save(trainer_state, str(tmp / "trainer_state.pd"))
    save_config(cfg, tmp / "config.yaml")
    if extras is not None:
        extras(tmp)
    info = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
    (tmp / "meta.json").write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
        old = root / f"{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    if keep_last > 0:
        prune_checkpoints(root, keep_last)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and all((d / f).is_file() for f in REQUIRED_FILES):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    root = Path(root)
    for d in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():  # leftovers of crashed saves by other processes
        if ".tmp-" in d.name or ".old-" in d.name:
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, or a run folder (-> its `final` or newest step folder)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if (path / "meta.json").is_file() or (path / "model.pdparams").is_file():
        missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
        return path
    for candidate in (path / "final", path / "checkpoints" / "final"):
        if candidate.is_dir():
            return resolve_checkpoint(candidate)
    for sub in (path, path / "checkpoints"):
        newest = latest_checkpoint(sub)
        if newest is not None:
            return newest
    raise CheckpointError(f"{path}: no complete checkpoint (needs {', '.join(REQUIRED_FILES)})")


def load_checkpoint_config(path: str | Path) -> tuple[Path, Config]:
    ckpt = resolve_checkpoint(path)
    return ckpt, load_saved_config(ckpt / "config.yaml")


def load_model_state(ckpt: Path) -> dict[str, Any]:
    try:
        return paddle.load(str(ckpt / "model.pdparams"))
    except Exception as exc:  # paddle raises assorted types for truncated files
        raise CheckpointError(f"{ckpt / 'model.pdparams'}: cannot load ({type(exc).__name__}: {exc})") from None


def set_model_state(model: paddle.nn.Layer, state: dict[str, Any], ckpt: Path) -> None:
    """Load weights strictly: a missing, unexpected or mis-shaped key is an error naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not match the model built from its config "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for key, value in state.items():
        if list(own[key].shape) != list(value.shape):
            raise CheckpointError(
                f"{ckpt}: {key} has shape {list(value.shape)} in the checkpoint but "
                f"{list(own[key].shape)} in the model (checkpoint from a different config?)"
            )
    model.set_state_dict(state)


def _param_names(model: paddle.nn.Layer) -> dict[str, str]:
    """Paddle's auto-generated parameter name (e.g. linear_4.w_0) -> structured key."""
    return {p.name: key for key, p in model.named_parameters()}


def _rename_state(state: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    # longest prefix first so that linear_1.w_0 never claims linear_1.w_0x keys
    prefixes = sorted(mapping, key=len, reverse=True)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = _rename_state(value, mapping)
            continue
        for prefix in prefixes:
            if key == prefix or key.startswith(prefix + "_"):
                key = mapping[prefix] + key[len(prefix):]
                break
        out[key] = value
    return out


def optimizer_state_to_structured(opt_state: dict[str, Any], model: paddle.nn.Layer) -> dict[str, Any]:
    """Key optimizer state by structured parameter names, so that a checkpoint loads into a
    model built in another process (Paddle's auto names depend on construction order)."""
    return _rename_state(opt_state, {auto: "@" + key for auto, key in _param_names(model).items()})


def optimizer_state_from_structured(state: dict[str, Any], model: paddle.nn.Layer) -> dict[str, Any]:
    return _rename_state(state, {"@" + key: auto for auto, key in _param_names(model).items()})
