"""Turn a (sharded) training checkpoint into one inference checkpoint folder.

The result is an ordinary checkpoint folder (the weights as one safetensors shard with its
index, `config.yaml` with the Distributed section reset to one process, `meta.json`, the
stage's extras) that every tool loads with `--ckpt DIR`. It reads both layouts (sharded
safetensors, or the older `model.pdparams` / `optimizer.*.pdopt`). With `with_optimizer`, the
optimizer parts are merged into one shard keyed by structured names, so the folder also resumes
in a single process (dp / stage 1 / 2 checkpoints; stage 3 shards are slices and cannot be
merged this way).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import paddle

from ernie_vilg.config import DistributedConfig, save_config
from ernie_vilg.checkpoint_io import (
    OPTIMIZER_PREFIX,
    SHARD_FILE,
    CheckpointError,
    is_weight_file,
    load_checkpoint_config,
    load_model_state,
    load_optimizer_state,
    read_meta,
    save_weights,
    write_index,
    write_shard,
)

# per-run files that an inference folder does not need
_TRAINING_FILES = ("optimizer.pdopt", "trainer_state.pd")


def merge_checkpoint(src: str | Path, out: str | Path, with_optimizer: bool = False,
                     dtype: Optional[str] = None) -> Path:
    ckpt, cfg = load_checkpoint_config(src)
    out = Path(out)
    if out.resolve() == ckpt.resolve():
        raise CheckpointError(f"{out}: the output folder must differ from the checkpoint")
    meta = read_meta(ckpt)
    state = load_model_state(ckpt)
    if dtype:
        # e.g. float16 O2 weights -> float32 for CPU inference
        state = {k: v.astype(dtype) if paddle.is_floating_point(v) else v for k, v in state.items()}
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(tmp, state)
    if with_optimizer:
        if meta.get("optimizer_layout") == "sliced":
            raise CheckpointError(f"{ckpt}: stage-3 optimizer shards are per-rank slices and cannot be merged; "
                                  "merge the weights only (without --with-optimizer)")
        opt = load_optimizer_state(ckpt)
        if opt is not None:
            write_shard(tmp, OPTIMIZER_PREFIX, opt, 0, 1)
            write_index(tmp, OPTIMIZER_PREFIX)
        if (ckpt / "trainer_state.pd").is_file():
            shutil.copyfile(ckpt / "trainer_state.pd", tmp / "trainer_state.pd")
    # the stage's extras (vocab, tokenizer copy, ...) and anything else that is not per-rank state
    for item in ckpt.iterdir():
        name = item.name
        if name in ("config.yaml", "meta.json", *_TRAINING_FILES) or is_weight_file(name) or SHARD_FILE.match(name) \
                or name.startswith("rank_state."):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / name)
        else:
            shutil.copyfile(item, tmp / name)
    cfg.Distributed = DistributedConfig(**{**cfg.Distributed.__dict__, "dp_degree": 1, "sharding_degree": 1,
                                           "sharding_stage": 1, "offload": False})
    save_config(cfg, tmp / "config.yaml")
    merged_meta = {**meta, "merged_from": str(ckpt), "world_size": 1, "dp_degree": 1, "sharding_degree": 1,
                   "sharding_stage": 1, "optimizer_layout": "whole",
                   "source_layout": {k: meta.get(k) for k in ("world_size", "dp_degree", "sharding_degree",
                                                                "sharding_stage")}}
    if dtype:
        merged_meta["dtype"] = dtype
    (tmp / "meta.json").write_text(json.dumps(merged_meta, ensure_ascii=False, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
