"""Shared command-line plumbing: config errors exit with code 2 and one line."""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

# Paddle prints a "No ccache found" notice when it is imported; it would turn a one-line error
# into two lines on stderr.
warnings.filterwarnings("ignore", message=".*ccache.*")
# ... and paddlenlp's import makes setuptools announce that it replaces distutils
warnings.filterwarnings("ignore", message=".*Setuptools is replacing distutils.*")

from ernie_vilg.config import Config, ConfigError, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                        help="override one config value (repeatable)")


def load_config_or_exit(path: str, overrides: list[str]) -> Config:
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_or_exit(fn: Callable[[], int], known_errors: tuple[type[BaseException], ...]) -> int:
    """Run `fn`; a known user error prints one line and exits 2 (no deep traceback)."""
    try:
        return fn()
    except known_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def exit_with(message: str) -> None:
    """One line on stderr, exit code 2 (a usage error found before any model is loaded)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def output_folder_problem(out: str, overwrite: bool = False) -> Optional[str]:
    """Why folder `out` cannot receive a tool's files, or None. Checked at argument parsing, so a
    bad `--out` is one line before the model loads, not a traceback after it has run."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        return f"--out {out}: is a file, not a folder"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, so no folder can be made under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable"
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        return (f"--out {out}: the folder already holds files; pass --overwrite to write into it "
                "(files of the same name are replaced), or choose a new folder")
    return None


def checkpoint_num_candidates(ckpt: str | Path) -> int:
    """`Generation.num_candidates` of a checkpoint, run or pretrained folder (1 when it has none or
    cannot be read here: loading the model reports a bad checkpoint properly later)."""
    if not Path(ckpt).exists():
        return 1
    from ernie_vilg.generation.pretrained import is_pretrained_dir, load_pretrained_config
    from ernie_vilg.checkpoint_io import CheckpointError, load_checkpoint_config

    try:
        cfg = load_pretrained_config(ckpt) if is_pretrained_dir(ckpt) else load_checkpoint_config(ckpt)[1]
    except (CheckpointError, ConfigError, OSError):
        return 1
    return int(cfg.Generation.num_candidates)


def check_generate_args(args: argparse.Namespace) -> None:
    """tools/generate.py's arguments, before anything loads: one line and exit 2 if unusable."""
    from ernie_vilg.data.manifest import has_visible_text

    if args.num_candidates < 1:
        exit_with(f"--num-candidates must be >= 1, got {args.num_candidates}")
    if not 0 <= args.keep <= args.num_candidates:
        exit_with(f"--keep must be between 0 (keep all) and --num-candidates ({args.num_candidates}), got {args.keep}")
    for i, text in enumerate(args.text or [], start=1):
        if not has_visible_text(text):
            exit_with(f"--text number {i} is empty: give the prompt to draw")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        exit_with(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    # a folder an earlier generate run wrote (its per-rank rows in .parts/) is resumed, not overwritten
    resumable = (Path(args.out) / ".parts").is_dir()
    problem = output_folder_problem(args.out, getattr(args, "overwrite", False) or resumable)
    if problem:
        exit_with(problem)

