"""What the registry knows of one stage (`StageSpec`), and what an export hook returns.

Kept apart from `stages/__init__.py` so the stage files can import these types without importing
the registry that imports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import paddle

from ernie_vilg.config import Config


@dataclass
class ExportGraph:
    """One static graph to export: `layer(*inputs)` traced with `specs`; `inputs` / `outputs`
    describe it in export.json ({"name", "shape" (-1 = any), "dtype"})."""

    name: str
    layer: paddle.nn.Layer
    specs: list[Any]  # paddle.static.InputSpec
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    description: str


# (the checkpoint's bare model with its weights, the resolved config, batch size) -> graphs
ExportHook = Callable[[paddle.nn.Layer, Config, int], list[ExportGraph]]


@dataclass(frozen=True)
class StageSpec:
    """One training stage: the registry entry every tool reads.

    - `module`: the TrainModule class (`module(resolved_cfg)`);
    - `resolve(cfg) -> Config`: returns a resolved copy (derived sizes filled in, references
      checked); the only place derived sizes are computed; never mutates its argument;
    - `build_model(cfg, ckpt_dir) -> Layer`: the bare model of a checkpoint of this stage from its
      resolved config, untrained (`ckpt_dir`: the checkpoint folder, for stages whose model needs a
      file next to the weights, such as the reranker's vocab);
    - `export`: the graphs `tools/export.py` writes, or None with `no_export_reason`;
    - `tools`: the tools that load its checkpoints (documentation and tests).
    """

    name: str
    summary: str
    module: type
    resolve: Callable[[Config], Config]
    build_model: Callable[[Config, Optional[Path]], paddle.nn.Layer]
    export: Optional[ExportHook] = None
    no_export_reason: str = ""
    tools: tuple[str, ...] = field(default_factory=tuple)
