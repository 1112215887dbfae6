"""Declarative name tables for weight converters, and writing a converted tokenizer checkpoint.

A table is a list of `Rule(source regex, target template | None, action)`, first match wins:

    copy  -> target key (re.sub template on the full source key), shape must equal the model's
    drop  -> not converted (e.g. taming's loss / discriminator weights), listed in the report
    extra -> collected into a side dict under the target key (e.g. LPIPS weights inside taming's
             checkpoint), returned beside the model state

`apply_table` asserts that every source key matches a rule, every model key is written exactly
once (except the `keep_init` keys the table declares, e.g. usage-statistics buffers the source
format does not have) and every shape matches. Errors are `ConversionError` naming the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ernie_vilg.convert.torch_pickle import CheckpointFormatError


class ConversionError(CheckpointFormatError):
    """Source weights do not fit the table or the target model."""


@dataclass(frozen=True)
class Rule:
    source: str  # regular expression, matched against the whole source key
    target: Optional[str]  # replacement template (\1 ...) or None for drop
    action: str = "copy"  # "copy" | "drop" | "extra"


@dataclass
class Converted:
    state: dict[str, np.ndarray]  # target model key -> array
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # "extra" rows
    dropped: list[str] = field(default_factory=list)  # source keys dropped by "drop" rows


def apply_table(source: dict[str, np.ndarray], rules: list[Rule], model_shapes: dict[str, list[int]],
                keep_init: tuple[str, ...] = (), where: str = "source") -> Converted:
    compiled = [(re.compile(r.source), r) for r in rules]
    out = Converted(state={})
    for key in source:
        for pattern, rule in compiled:
            if pattern.fullmatch(key):
                break
        else:
            raise ConversionError(f"{where}: key {key!r} matches no row of the conversion table")
        if rule.action == "drop":
            out.dropped.append(key)
            continue
        target = pattern.sub(rule.target, key)
        if rule.action == "extra":
            out.extras[target] = source[key]
            continue
        if target not in model_shapes:
            raise ConversionError(f"{where}: {key!r} maps to {target!r}, which the target model does not have")
        if target in out.state:
            raise ConversionError(f"{where}: two source keys map to {target!r}")
        value = np.asarray(source[key])
        if list(value.shape) != list(model_shapes[target]):
            raise ConversionError(f"{where}: {key!r} has shape {list(value.shape)} but {target!r} "
                                  f"needs {list(model_shapes[target])}")
        out.state[target] = value
    missing = sorted(set(model_shapes) - set(out.state) - set(keep_init))
    if missing:
        raise ConversionError(f"{where}: the source has nothing for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return out


def tokenizer_target(stage: str, vq_cfg: Any, image_size: int) -> tuple[Any, Any]:
    """(config, bare model) of the tokenizer checkpoint a converter writes: stage `stage` (vq,
    vqgan or dvae), `VQ` inferred from the source weights, `Data.image_size`; the model is the
    stage registry's."""
    from ernie_vilg.config import Config
    from ernie_vilg.stages import build_bare_model

    cfg = Config()
    cfg.Global.stage = stage
    cfg.VQ = vq_cfg
    cfg.Data.image_size = image_size
    return cfg, build_bare_model(cfg)


def write_tokenizer_checkpoint(out: str | Path, cfg: Any, model: Any, state: dict[str, np.ndarray],
                               meta: dict[str, Any]) -> Path:
    """Load `state` strictly into `model` (keep_init keys keep the model's values) and write a
    checkpoint folder `out` that `load_tokenizer` / `--ckpt` read (model.pdparams, config.yaml,
    meta.json, tokenizer.json)."""
    import paddle

    from ernie_vilg.checkpoint_io import begin_checkpoint, commit_checkpoint
    from ernie_vilg.vq.base import write_tokenizer_info

    own = model.state_dict()
    full = {k: paddle.to_tensor(state[k].astype(own[k].numpy().dtype)) if k in state else own[k] for k in own}
    model.set_state_dict(full)
    out = Path(out)
    model.grid_size(cfg.Data.image_size)  # the image size must divide by the downsample factor

    def extras(tmp: Path) -> None:
        write_tokenizer_info(model, cfg.Data.image_size, tmp)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, final = begin_checkpoint(out.parent, 0, name=out.name)
    return commit_checkpoint(tmp, final, 0, cfg, model.state_dict(), meta=meta, extras=extras)
