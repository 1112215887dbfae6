"""Checkpoint folders: atomic save, keep-last-N, find the newest complete one, load.

A checkpoint is a folder that any tool loads with `--ckpt DIR` alone:

    model.pdparams      model weights (state_dict; full weights even under sharding)
    optimizer.pdopt     optimizer state, keyed by structured parameter names (single process / dp)
    optimizer.shard-SS-of-NN.pdopt   under sharding: sharding rank SS's part (saved by dp rank 0)
    trainer_state.pd    step, data position, RNG states, scaler state (rank 0's)
    rank_state.RRRRR.pd each rank's data position and RNG states (multi-process runs)
    config.yaml         the resolved config
    meta.json           what produced it (written last: its presence marks a complete folder)
    ...                 stage extras (vocab.txt, tokenizer/ ...)

Saving writes everything into `<name>.tmp-<pid of rank 0>` and renames it to `<name>` at the
end, so a crash mid-save leaves only a temporary folder that loading ignores and the next save
removes. Stage-1 / stage-2 optimizer shards hold whole parameters' states, so their union is the
full optimizer state and loads under any sharding degree; stage 3 shards hold flat slices and
load only under the degree that wrote them (`load_optimizer_state` says so).
These are the project's own files: `paddle.load` is used on them; never point it at a file
from outside (use `ernie_vilg.convert` readers for those).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
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


def _fsync_files(folder: Path, names: Optional[list[str]] = None) -> None:
    for f in folder.iterdir():
        if f.is_file() and (names is None or f.name in names):
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def begin_checkpoint(root: str | Path, step: int, name: Optional[str] = None,
                     tag: Optional[int] = None, create: bool = True) -> tuple[Path, Path]:
    """(temporary folder, final folder) of a checkpoint being written.

    `tag` names the temporary folder (default: this pid); multi-process saves pass rank 0's pid
    so that every rank writes into the same folder and a dead job's leftovers can be detected.
    Dead writers' leftovers are recovered or removed first: a disk that filled up once must not
    fill up again with one more dead `.tmp` per retry."""
    root = Path(root)
    final = root / (name or f"step-{step:08d}")
    tmp = root / f"{final.name}.tmp-{tag if tag is not None else os.getpid()}"
    if create:
        root.mkdir(parents=True, exist_ok=True)
        recover_interrupted(root)
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:
            raise CheckpointError(f"{tmp}: cannot create the checkpoint folder ({_os_reason(exc)})") from None
    return tmp, final


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _float_state_finite(state: dict[str, Any]) -> list[str]:
    """Keys of floating tensors holding NaN or inf (an empty list when every value is finite)."""
    bad = []
    for key, value in state.items():
        if isinstance(value, paddle.Tensor) and value.dtype in (paddle.float32, paddle.float16,
                                                                  paddle.bfloat16, paddle.float64):
            if value.size and not bool(paddle.isfinite(value.astype("float32")).all()):
                bad.append(key)
        elif hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f":
            import numpy as np

            if not np.isfinite(value).all():
                bad.append(key)
    return bad


def commit_checkpoint(
    tmp: Path,
    final: Path,
    step: int,
    cfg: Config,
    model_state: dict[str, Any],
    optimizer_state: Optional[dict[str, Any]] = None,
    trainer_state: Optional[dict[str, Any]] = None,
    meta: Optional[dict[str, Any]] = None,
    extras: Optional[Callable[[Path], None]] = None,
    keep_last: int = 0,
) -> Path:
    """Write the shared files into `tmp`, meta.json last, then rename `tmp` to `final`.

    Non-finite weights are refused before anything is written (the newest checkpoint stays the
    last good state). A write that fails (disk full, read-only) removes `tmp` and raises one-line
    CheckpointError. Re-saving an existing `final` moves it to `.old-<pid>` for the instant between
    two renames; a kill there leaves two complete folders that `recover_interrupted` puts back."""
    root = final.parent
    bad = _float_state_finite(model_state)
    if bad:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: not saved: non-finite weights (NaN / inf) in {', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}; the newest checkpoint is the last good state "
                              "(lower Optimizer.lr?)")
    try:
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
        _fsync_files(tmp)
        _fsync_dir(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        space = " (free some space: nothing was written)" if exc.errno == errno.ENOSPC else ""
        raise CheckpointError(f"{final}: cannot write the checkpoint ({_os_reason(exc)}){space}; "
                              f"removed the partial {tmp.name}") from None
    if final.exists():  # re-saving the same step (e.g. final save after a periodic one, OUTPUT/best)
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
    tmp, final = begin_checkpoint(root, step, name)
    return commit_checkpoint(tmp, final, step, cfg, model_state, optimizer_state, trainer_state,
                             meta, extras, keep_last)


# ---- per-rank files of multi-process runs ----------------------------------------------------
SHARD_FILE = re.compile(r"^optimizer\.shard-(\d+)-of-(\d+)\.pdopt$")


def optimizer_shard_name(sharding_rank: int, sharding_degree: int) -> str:
    return f"optimizer.shard-{sharding_rank:02d}-of-{sharding_degree:02d}.pdopt"


def rank_state_name(rank: int) -> str:
    return f"rank_state.{rank:05d}.pd"


def save_file(obj: Any, folder: Path, filename: str) -> None:
    """One rank's file into a checkpoint being written (fsynced before the commit barrier)."""
    paddle.save(obj, str(folder / filename))
    _fsync_files(folder, [filename])


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def optimizer_shards(ckpt: Path) -> list[Path]:
    """The shard files of a sharded checkpoint, checked to be complete; [] if not sharded."""
    found = {}
    for f in ckpt.iterdir():
        m = SHARD_FILE.match(f.name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), f)
    if not found:
        return []
    degrees = {n for n, _ in found.values()}
    if len(degrees) != 1:
        raise CheckpointError(f"{ckpt}: optimizer shards of different sharding degrees {sorted(degrees)}")
    (degree,) = degrees
    missing = [optimizer_shard_name(r, degree) for r in range(degree) if r not in found]
    if missing:
        raise CheckpointError(f"{ckpt}: incomplete sharded optimizer state, missing {', '.join(missing)}")
    return [found[r][1] for r in range(degree)]


def _load(path: Path) -> Any:
    from ernie_vilg.convert.safetensors_io import safe_paddle_load

    try:
        return safe_paddle_load(path)
    except Exception as exc:  # paddle raises assorted types for truncated files
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None


def merge_optimizer_shards(shards: list[dict[str, Any]], where: Path) -> dict[str, Any]:
    """Union of stage-1 / stage-2 shards (disjoint parameters; shared scalars such as the LR
    scheduler are taken from the first shard)."""
    merged: dict[str, Any] = {}
    for shard in shards:
        for key, value in shard.items():
            if isinstance(value, dict):
                part = merged.setdefault(key, {})
                overlap = set(part) & set(value)
                if overlap and key == "master_weights":
                    raise CheckpointError(f"{where}: master weights of {sorted(overlap)[:3]} in two shards")
                part.update({k: v for k, v in value.items() if k not in part})
            elif key in merged:
                if key != "LR_Scheduler":
                    raise CheckpointError(f"{where}: optimizer key {key} appears in two shards")
            else:
                merged[key] = value
    return merged


def load_optimizer_state(ckpt: Path, sharding_rank: int = 0, sharding_degree: int = 1) -> Optional[dict[str, Any]]:
    """The structured optimizer state this rank needs, or None if the checkpoint has none.

    Whole-parameter layouts (single process, dp, stage 1, stage 2) return the full state, from
    which each sharded optimizer takes its own parameters, so any sharding degree works. A stage-3
    checkpoint stores flat slices whose boundaries depend on the degree: it loads only under the
    same degree."""
    if (ckpt / "optimizer.pdopt").is_file():
        return _load(ckpt / "optimizer.pdopt")
    files = optimizer_shards(ckpt)
    if not files:
        return None
    meta = read_meta(ckpt)
    if meta.get("optimizer_layout") == "sliced":
        saved = len(files)
        if saved != sharding_degree or meta.get("sharding_stage") != 3:
            raise CheckpointError(
                f"{ckpt}: optimizer state was saved by sharding stage 3 with sharding_degree={saved}; "
                f"stage 3 stores flat per-rank slices of each parameter whose boundaries depend on the "
                f"degree, so it resumes only with Distributed.sharding_stage=3 and sharding_degree={saved} "
                f"(the weights in model.pdparams are complete: tools/merge_checkpoint.py --ckpt {ckpt} --out DIR "
                f"writes them as one checkpoint, which resumes under any layout with "
                f"Train.resume_weights_only=true and a fresh optimizer)")
        return _load(files[sharding_rank])
    return merge_optimizer_shards([_load(f) for f in files], ckpt)


def state_bytes(state: Any) -> int:
    """Bytes of all tensors in a (nested) state dict."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if isinstance(state, paddle.Tensor):
        return int(state.numel()) * state.element_size()
    if hasattr(state, "nbytes"):
        return int(state.nbytes)
    return 0


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


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in REQUIRED_FILES)


def _dead_leftovers(root: Path) -> list[tuple[Path, str, str]]:
    """(folder, final name, kind) of `.tmp-<pid>` / `.old-<pid>` folders whose writer is gone."""
    out = []
    for d in root.iterdir():
        for kind in (".tmp-", ".old-"):
            if kind in d.name:
                name, pid = d.name.rsplit(kind, 1)
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    out.append((d, name, kind))
    return out


def recover_interrupted(root: str | Path) -> list[Path]:
    """Undo what a writer killed mid-commit left under `root`, never losing a complete copy.

    A kill between the two renames of a re-save (`final` -> `.old-<pid>`, `.tmp-<pid>` ->
    `final`) leaves no `final` but two complete folders: the new one (`.tmp`, meta.json was
    written and fsynced before the renames) is put back as `final`, else the old one. Then the
    dead writers' other leftovers are removed. Returns the folders restored."""
    root = Path(root)
    if not root.is_dir():
        return []
    restored = []
    leftovers = _dead_leftovers(root)
    for kind in (".tmp-", ".old-"):  # the newer copy first
        for d, name, k in leftovers:
            final = root / name
            if k == kind and not final.exists() and _complete(d):
                try:
                    d.rename(final)
                except OSError:
                    continue
                logging.getLogger(__name__).warning("recovered %s from an interrupted save (%s)", final, d.name)
                restored.append(final)
    for d, _, _ in leftovers:
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
    return restored


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    root = Path(root)
    recover_interrupted(root)  # first: a dead re-save's complete copies count as checkpoints
    for d in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a killed writer whose parent died too stays a zombie where pid 1 does not reap (some containers):
    # it answers signal 0 but will never finish its save
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust the signal
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


LOCK_FILE = ".lock"


class OutputLock:
    """One training run per output folder: `OUTPUT/.lock` holds the owner's pid and host.

    Two runs on one folder would overwrite each other's checkpoints (one run's result then points
    at the other's weights; with the same seed they crashed with ENOTEMPTY). A lock whose process
    is gone (killed, machine rebooted) is stale and taken over. The same process may take it
    again (a Trainer rebuilt in one process resumes its own run)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.held = False

    def _owner(self) -> tuple[int, str]:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return int(info.get("pid", -1)), str(info.get("host", ""))
        except (OSError, ValueError, TypeError, AttributeError):
            return -1, ""  # unreadable (a writer killed mid-write): treated as stale

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._owner()
                if pid == os.getpid() and host == socket.gethostname():
                    self.held = True
                    return self
                if pid > 0 and (host != socket.gethostname() or _pid_alive(pid)):
                    where = "" if host == socket.gethostname() else f" on {host}"
                    raise CheckpointError(f"{self.path.parent}: in use by another training run (pid {pid}{where}); "
                                          f"use another Global.output_dir, or delete {self.path} if that run is gone")
                logging.getLogger(__name__).warning("%s: taking over a stale lock (pid %s is gone)", self.path, pid)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(me))
            self.held = True
            return self
        raise CheckpointError(f"{self.path}: could not take the output folder's lock")

    def release(self) -> None:
        if self.held and self._owner() == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
        self.held = False


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
    from ernie_vilg.convert.safetensors_io import safe_paddle_load

    try:
        return safe_paddle_load(ckpt / "model.pdparams")
    except Exception as exc:  # paddle raises assorted types for truncated files
        raise CheckpointError(f"{ckpt / 'model.pdparams'}: cannot load ({type(exc).__name__}: {exc})") from None


def optional_state_keys(model: paddle.nn.Layer) -> set[str]:
    """State keys a checkpoint may lack: those a layer lists in its `optional_state_keys`
    (parameters added after checkpoints had been written, e.g. ErnieViLG.null_img_emb)."""
    out: set[str] = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        for key in getattr(layer, "optional_state_keys", ()):
            out.add(f"{prefix}.{key}" if prefix else key)
    return out


def set_model_state(model: paddle.nn.Layer, state: dict[str, Any], ckpt: Path) -> None:
    """Load weights strictly: a missing, unexpected or mis-shaped key is an error naming it.

    Only the model's `optional_state_keys` may be missing (an older checkpoint): they keep their
    initial value and a warning names them."""
    own = model.state_dict()
    tolerated = sorted((set(own) - set(state)) & optional_state_keys(model))
    if tolerated:
        logging.getLogger(__name__).warning(
            "%s: no %s in the checkpoint (written before it existed): keeping its initial value",
            ckpt, ", ".join(tolerated))
    missing = sorted(set(own) - set(state) - set(tolerated))
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
    model.set_state_dict(cast_to_model_dtypes(state, own))


def cast_to_model_dtypes(state: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """Floating-point weights take the dtype of the model's own tensor, so a float16 / bfloat16
    merge (tools/merge_checkpoint.py --dtype) loads into the float32 model a CPU builds, and back;
    Paddle's set_state_dict would only assert that the dtypes are equal."""
    out = {}
    for key, value in state.items():
        target = own.get(key)
        if isinstance(value, paddle.Tensor) and target is not None and value.dtype != target.dtype \
                and paddle.is_floating_point(value) and paddle.is_floating_point(target):
            value = value.astype(target.dtype)
        out[key] = value
    return out


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
