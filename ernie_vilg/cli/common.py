"""Shared command-line plumbing: config errors exit with code 2 and one line."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable

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
