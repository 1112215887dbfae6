"""The checkpoint folder format: atomic save, keep-last-N, find the newest complete one, load.

Floor 0: config and Paddle only, so every room (tokenizers, generation, convert, training) reads
and writes checkpoints through it.

A checkpoint is a folder that any tool loads with `--ckpt DIR` alone:

    model-KKKKK-of-NNNNN.safetensors   model weights, split over the N ranks that wrote them (each
                        rank its part of the names); full weights even under sharding
    model.safetensors.index.json       which file holds each tensor (PaddleNLP's unified layout)
    optimizer-KKKKK-of-NNNNN.safetensors + optimizer.safetensors.index.json
                        optimizer state keyed by structured parameter names: a part of the names
                        per rank (dp), or each sharding rank's own states (stages 1 / 2); nested
                        keys joined by "/", non-tensor entries (LR scheduler) as JSON metadata
    optimizer.shard-SS-of-NN.pdopt     stage 3 only (GPU): sharding rank SS's flat slices
    trainer_state.pd    step, data position, RNG states, scaler state (rank 0's)
    rank_state.RRRRR.pd each rank's data position and RNG states (multi-process runs)
    config.yaml         the resolved config
    meta.json           what produced it (written last: its presence marks a complete folder)
    ...                 stage extras (vocab.txt, tokenizer/ ...)

Checkpoints written before the sharded layout (`model.pdparams`, `optimizer.pdopt`,
`optimizer.shard-*.pdopt` of any stage) still load. Weights are written one tensor at a time
(`safetensors_file.write_safetensors_streaming`) and read lazily, one tensor at a time.

Saving writes everything into `<name>.tmp-<pid of rank 0>` and renames it to `<name>` at the
end, so a crash mid-save leaves only a temporary folder that loading ignores and the next save
removes. Stage-1 / stage-2 optimizer states are whole parameters' states, so their union is the
full optimizer state and loads under any sharding degree; stage 3 shards hold flat slices and
load only under the degree that wrote them (`load_optimizer_state` says so).
The pickles here are the project's own (trainer and rank state, old-layout weights); they are
read through `safe_pickle.safe_load` all the same.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import paddle

from ernie_vilg.config import Config, load_saved_config, save_config

STEP_DIR = re.compile(r"^step-(\d+)$")
REQUIRED_FILES = ("config.yaml", "meta.json")  # + the weights: an index of shards or model.pdparams
LEGACY_WEIGHTS = "model.pdparams"
WEIGHTS_PREFIX, OPTIMIZER_PREFIX = "model", "optimizer"
SHARDED_FILE = re.compile(r"^(model|optimizer)-(\d{5})-of-(\d{5})\.safetensors$")


def shard_name(prefix: str, index: int, count: int) -> str:
    """`model-00001-of-00002.safetensors` for index 0 of 2."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def index_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def has_weights(folder: Path) -> bool:
    """A folder with model weights in either layout (sharded safetensors, or model.pdparams)."""
    return (folder / index_name(WEIGHTS_PREFIX)).is_file() or (folder / LEGACY_WEIGHTS).is_file()


def weight_files(folder: Path) -> list[str]:
    """The names of the files that hold a checkpoint's model weights (to copy a sub-checkpoint)."""
    if (folder / index_name(WEIGHTS_PREFIX)).is_file():
        index = json.loads((folder / index_name(WEIGHTS_PREFIX)).read_text(encoding="utf-8"))
        return [index_name(WEIGHTS_PREFIX), *sorted(set(index["weight_map"].values()))]
    return [LEGACY_WEIGHTS] if (folder / LEGACY_WEIGHTS).is_file() else []


def save_weights(folder: Path, state: dict[str, Any]) -> None:
    """Write (or replace) the model weights of a checkpoint folder: one shard and its index."""
    for f in folder.glob(f"{WEIGHTS_PREFIX}-*-of-*.safetensors"):
        f.unlink()
    (folder / LEGACY_WEIGHTS).unlink(missing_ok=True)
    write_shard(folder, WEIGHTS_PREFIX, state, 0, 1)
    write_index(folder, WEIGHTS_PREFIX)


def copy_loadable(src: Path, dst: Path) -> None:
    """Copy what loading a checkpoint needs (weights of either layout, config.yaml, meta.json)
    into `dst`: a sub-checkpoint such as the image tokenizer inside a vilg checkpoint."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*weight_files(src), *REQUIRED_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def is_weight_file(name: str) -> bool:
    """Model / optimizer weight files of either layout (not text extras)."""
    return bool(SHARDED_FILE.match(name)) or name in (LEGACY_WEIGHTS, index_name(WEIGHTS_PREFIX),
                                                      index_name(OPTIMIZER_PREFIX))


# ---- sharded safetensors ---------------------------------------------------------------------
def partition_names(state: dict[str, Any], parts: int) -> list[list[str]]:
    """Split the names of `state` into `parts` lists of about equal bytes (largest first, each to
    the lightest part; ties by name), the same on every rank."""
    import numpy as np

    from ernie_vilg.safetensors_file import DTYPES, tensor_spec

    def nbytes(name: str) -> int:
        dtype, shape = tensor_spec(state[name], name)
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][1]).itemsize

    sizes = {name: nbytes(name) for name in state}
    out: list[list[str]] = [[] for _ in range(parts)]
    load = [0] * parts
    for name in sorted(state, key=lambda n: (-sizes[n], n)):
        k = min(range(parts), key=lambda i: (load[i], i))
        out[k].append(name)
        load[k] += sizes[name]
    return out


def flatten_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors keyed "a/b", everything else as a nested dict): a nested state dict (optimizer
    state: master weights, LR scheduler) split into what safetensors holds and what JSON holds."""
    import numpy as np

    tensors: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            t, o = flatten_state(value, f"{name}/")
            tensors.update(t)
            if o:
                other[key] = o
        elif isinstance(value, (paddle.Tensor, np.ndarray)):
            tensors[name] = value
        else:
            other[key] = value
    return tensors, other


def unflatten_state(tensors: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(json.dumps(other))  # a deep copy of plain JSON values
    for name, value in tensors.items():
        *path, leaf = name.split("/")
        node = state
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return state


def write_shard(folder: Path, prefix: str, state: dict[str, Any], index: int, count: int) -> None:
    """One rank's part of a sharded state: `state` (nested dicts allowed) -> one safetensors
    file; its non-tensor entries go into the file's metadata. Tensors are copied to host memory
    one at a time."""
    from ernie_vilg.safetensors_file import write_safetensors_streaming

    tensors, other = flatten_state(state)
    write_safetensors_streaming(tensors, folder / shard_name(prefix, index, count),
                                {"format": "ernie-vilg", "other": json.dumps(other)})


def write_partition(folder: Path, prefix: str, state: dict[str, Any], rank: int, world: int) -> None:
    """This rank's `partition_names` share of a state every rank holds whole (dp weights)."""
    from ernie_vilg.safetensors_file import write_safetensors_streaming

    tensors, other = flatten_state(state)
    part = {name: tensors[name] for name in partition_names(tensors, world)[rank]}
    write_safetensors_streaming(part, folder / shard_name(prefix, rank, world),
                                {"format": "ernie-vilg", "other": json.dumps(other if rank == 0 else {})})


def write_index(folder: Path, prefix: str) -> Optional[Path]:
    """`<prefix>.safetensors.index.json` from the headers of the shard files in `folder` (written
    once, by the committing rank, after every rank wrote its file); None without shards."""
    from ernie_vilg.safetensors_file import SafetensorsReader

    files = sorted(f for f in folder.iterdir() if (m := SHARDED_FILE.match(f.name)) and m.group(1) == prefix)
    if not files:
        return None
    counts = {int(SHARDED_FILE.match(f.name).group(3)) for f in files}
    if len(counts) != 1 or len(files) != counts.pop():
        raise CheckpointError(f"{folder}: incomplete {prefix} shards ({', '.join(f.name for f in files)})")
    weight_map: dict[str, str] = {}
    total = 0
    for f in files:
        with SafetensorsReader(f) as reader:
            for name in reader.keys():
                if name in weight_map:
                    raise CheckpointError(f"{folder}: tensor {name} is in {weight_map[name]} and {f.name}")
                weight_map[name] = f.name
                begin, end = reader.header[name]["data_offsets"]
                total += end - begin
    path = folder / index_name(prefix)
    path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1),
                    encoding="utf-8")
    return path


def read_sharded(folder: Path, prefix: str, keep: Optional[Callable[[str], bool]] = None) -> dict[str, Any]:
    """The state a sharded index describes (nested dicts rebuilt), each tensor read once and
    lazily; `keep(name)` False skips a tensor (never read from disk)."""
    from ernie_vilg.safetensors_file import SafetensorsError, SafetensorsReader

    index_path = folder / index_name(prefix)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        files = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index_path}: unreadable index ({type(exc).__name__}: {exc})") from None
    tensors: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for name in files:
        if not SHARDED_FILE.match(name):
            raise CheckpointError(f"{index_path}: {name!r} is not a shard file name")
        try:
            with SafetensorsReader(folder / name) as reader:
                extra = json.loads(reader.metadata.get("other", "{}") or "{}")
                for key, value in extra.items():
                    other.setdefault(key, value)  # shared scalars (LR scheduler): the first file's
                for key in reader.keys():
                    if keep is None or keep(key):
                        tensors[key] = reader.get(key)
        except (SafetensorsError, ValueError) as exc:
            raise CheckpointError(f"{folder / name}: cannot load ({exc})") from None
    missing = sorted(set(index["weight_map"]) - set(tensors) - {k for k in index["weight_map"]
                                                                  if keep is not None and not keep(k)})
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but not found: {', '.join(missing[:3])}")
    return unflatten_state(tensors, other)


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
    shards_written: bool = False,
) -> Path:
    """Write the shared files into `tmp`, meta.json last, then rename `tmp` to `final`.

    The weights (and `optimizer_state`) are written as one shard each, unless `shards_written`:
    then every rank has written its part already and only the indexes are written here
    (`model_state` is still checked for non-finite values).

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
        if not shards_written:
            write_shard(tmp, WEIGHTS_PREFIX, model_state, 0, 1)
            if optimizer_state is not None:
                write_shard(tmp, OPTIMIZER_PREFIX, optimizer_state, 0, 1)
        write_index(tmp, WEIGHTS_PREFIX)
        write_index(tmp, OPTIMIZER_PREFIX)
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
    from ernie_vilg.safe_pickle import safe_load

    try:
        return safe_load(path)
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


def load_optimizer_state(ckpt: Path, sharding_rank: int = 0, sharding_degree: int = 1,
                         keep: Optional[Callable[[str], bool]] = None) -> Optional[dict[str, Any]]:
    """The structured optimizer state this rank needs, or None if the checkpoint has none.
    `keep(name)`: in the sharded layout, read only the tensors it accepts (a sharded optimizer's
    own states); the older layouts are read whole.

    Whole-parameter layouts (single process, dp, stage 1, stage 2) return the full state, from
    which each sharded optimizer takes its own parameters, so any sharding degree works. A stage-3
    checkpoint stores flat slices whose boundaries depend on the degree: it loads only under the
    same degree."""
    if (ckpt / index_name(OPTIMIZER_PREFIX)).is_file():
        return read_sharded(ckpt, OPTIMIZER_PREFIX, keep)
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
                f"(the weights are complete: tools/merge_checkpoint.py --ckpt {ckpt} --out DIR "
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
        if m and d.is_dir() and all((d / f).is_file() for f in REQUIRED_FILES) and has_weights(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in REQUIRED_FILES) and has_weights(folder)


def _dead_leftovers(root: Path) -> list[tuple[Path, str, str]]:
    """(folder, final name, kind) of `.tmp-<pid>` / `.old-<pid>` folders whose writer is gone."""
    out = []
    for d in root.iterdir():
        for kind in (".tmp-", ".old-"):
            if kind in d.name:
                name, pid = d.name.rsplit(kind, 1)
                if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
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


def pid_alive(pid: int) -> bool:
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
    """The model weights of a checkpoint folder, in either layout."""
    from ernie_vilg.safe_pickle import safe_load

    if (ckpt / index_name(WEIGHTS_PREFIX)).is_file():
        return read_sharded(ckpt, WEIGHTS_PREFIX)
    try:
        return safe_load(ckpt / LEGACY_WEIGHTS)
    except Exception as exc:  # paddle raises assorted types for truncated files
        raise CheckpointError(f"{ckpt / LEGACY_WEIGHTS}: cannot load ({type(exc).__name__}: {exc})") from None


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
    _check_state_keys(model, own, state, ckpt)
    model.set_state_dict(cast_to_model_dtypes(state, own))


def _check_state_keys(model: paddle.nn.Layer, own: dict[str, Any], state: dict[str, Any], ckpt: Path) -> None:
    """The strict name and shape checks of `set_model_state` (values need only a `.shape`)."""
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


def load_weights_into(model: paddle.nn.Layer, ckpt: Path) -> None:
    """`set_model_state(model, load_model_state(ckpt), ckpt)` with the same strict checks, but in
    the sharded layout each tensor is read, cast and copied into the model one at a time, so
    loading holds one tensor in host memory beyond the model (names and shapes are checked from
    the shards' headers before any data is read)."""
    from ernie_vilg.safetensors_file import SafetensorsError, SafetensorsReader

    if not (ckpt / index_name(WEIGHTS_PREFIX)).is_file():
        set_model_state(model, load_model_state(ckpt), ckpt)
        return
    try:
        index = json.loads((ckpt / index_name(WEIGHTS_PREFIX)).read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(index.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{ckpt / index_name(WEIGHTS_PREFIX)}: unreadable index ({exc})") from None
    readers: dict[str, Any] = {}
    try:
        for name in files:
            readers[name] = SafetensorsReader(ckpt / name)
    except SafetensorsError as exc:  # its message names the shard file
        for reader in readers.values():
            reader.close()
        raise CheckpointError(str(exc)) from None
    try:
        shapes = {key: readers[index[key]].shape(key) for key in index}

        own = model.state_dict()
        _check_state_keys(model, own, {k: _Shape(v) for k, v in shapes.items()}, ckpt)
        for key in index:
            value = cast_to_model_dtypes({key: readers[index[key]].get(key)}, own)[key]
            own[key].set_value(value)
            del value
    except (SafetensorsError, KeyError) as exc:
        raise CheckpointError(f"{ckpt}: cannot load ({exc})") from None
    finally:
        for reader in readers.values():
            reader.close()


class _Shape:
    """Stands for a tensor in the strict checks when only its shape is known."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = shape


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
