"""Training-side checkpoint helpers: the output folder's lock and optimizer state keyed by
structured parameter names (so it loads into a model built in another process). The folder format
itself is `ernie_vilg.checkpoint_io`."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import paddle

from ernie_vilg.checkpoint_io import CheckpointError, pid_alive

LOCK_FILE = ".lock"


class OutputLock:
    """One training run per output folder: `OUTPUT/.lock` holds the owner's pid and host.

    Two runs on one folder would overwrite each other's checkpoints (one run's result then points
    at the other's weights; with the same seed they crashed with ENOTEMPTY). A lock whose process
    is gone (killed, machine rebooted) is stale and taken over. The same process may take it
    again (a Trainer rebuilt in one process resumes its own run)."""

    def __init__(self, folder: str | Path, filename: str = LOCK_FILE) -> None:
        self.path = Path(folder) / filename
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
                if pid > 0 and (host != socket.gethostname() or pid_alive(pid)):
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

    def try_acquire(self) -> bool:
        """`acquire`, but False instead of an error while another live process holds the lock."""
        try:
            self.acquire()
        except CheckpointError:
            return False
        return True

    def release(self) -> None:
        if self.held and self._owner() == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
        self.held = False


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


def owned_state_filter(model: paddle.nn.Layer, owned: list[Any]) -> Callable[[str], bool]:
    """Predicate over structured optimizer-state names ("@<param>_moment1_0",
    "master_weights/@<param>"): True for the states of the `owned` parameters and for names that
    belong to no parameter."""
    structured = {"@" + key for key in _param_names(model).values()}
    mine = {"@" + _param_names(model)[p.name] for p in owned if p.name in _param_names(model)}
    prefixes = sorted(structured, key=len, reverse=True)

    def keep(name: str) -> bool:
        leaf = name.split("/")[-1]
        owner = next((p for p in prefixes if leaf == p or leaf.startswith(p + "_")), None)
        return owner is None or owner in mine

    return keep


def optimizer_state_from_structured(state: dict[str, Any], model: paddle.nn.Layer) -> dict[str, Any]:
    return _rename_state(state, {"@" + key: auto for auto, key in _param_names(model).items()})
