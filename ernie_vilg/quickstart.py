"""The quickstart: the whole ERNIE-ViLG pipeline on the synthetic shapes world, on one CPU.

Stages (each is skipped when its output is already complete, so a re-run resumes):
  1. shapes world       data/{train,val,test}.jsonl + images
  2. image tokenizer    vq/checkpoints/step-*  (tools/train.py -c configs/vq/shapes_vqvae_48px.yaml)
  3. token shards       tokens/{train,val,test}
  4. text vocab         vocab.txt
  5. ERNIE-ViLG         vilg/checkpoints/step-*  (tools/train.py -c configs/vilg/shapes.yaml)
  6. evaluation         metrics.json, captions.jsonl, samples/grid.png (held-out test images)
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ernie_vilg.config import Config, load_config

log = logging.getLogger("ernie_vilg.quickstart")

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class QuickstartPlan:
    # 30,000 training images: with 6,000 the text-to-image loss overfits (val 1.35 vs train 0.90 nats at
    # step 1,500); rendering and tokenizing the extra images costs ~40 s (docs/benchmarks.md, session 6)
    num_train: int = 30000
    num_val: int = 200
    num_test: int = 200
    image_size: int = 48  # 6 x 6 image tokens at f = 8, 2 x 2 per grid cell: configs/vq/shapes_vqvae_48px.yaml
    min_objects: int = 1
    max_objects: int = 3
    # random offset of each (small) object inside its cell: off, because with it the 6 x 6
    # tokenizer's decoded gold tokens reach only 63 % all-five vs 99 % without (docs/benchmarks.md,
    # "Tokenizer ceiling (session 6)"); a text-to-image model cannot beat its tokenizer
    jitter: bool = False
    seed: int = 0
    vq_config: str = "vq/shapes_vqvae_48px.yaml"
    vilg_config: str = "vilg/shapes.yaml"
    # stage 5's run folder and where the evaluation writes ("" = the output folder itself), so the
    # long recipe (LONG_PLAN) shares stages 1-4 with the quickstart in one output folder
    vilg_dir: str = "vilg"
    eval_dir: str = ""
    vq_overrides: tuple[str, ...] = ()
    vilg_overrides: tuple[str, ...] = ()
    eval_images: int = 200  # held-out test items scored in both directions
    # text-to-image samples per test caption; > 1 adds best-of-N (ranked by the model's own caption
    # likelihood) next to the single-sample judge scores
    eval_candidates: int = 8
    # stage 5 as this many one-thread data-parallel processes (1 = in this process, all threads)
    vilg_processes: int = 2


# A smoke version of the same pipeline for the end-to-end test (minutes -> seconds).
SMOKE_PLAN = QuickstartPlan(
    num_train=64, num_val=16, num_test=16, image_size=32, jitter=True,  # tiny_vqvae is f = 4: 8 x 8 tokens
    vq_config="vq/tiny_vqvae.yaml", vilg_config="vilg/tiny.yaml",
    eval_images=8, eval_candidates=2,
)


# The convergence study's long recipe (configs/vilg/shapes_long.yaml, `tools/quickstart.py --long`):
# the same world, tokenizer and model, trained about an hour with a checkpoint every 1,000 steps.
# Measured in one process of one thread (docs/benchmarks.md), hence vilg_processes=1.
LONG_PLAN = replace(QuickstartPlan(), vilg_config="vilg/shapes_long.yaml", vilg_dir="vilg_long", eval_dir="long",
                    vilg_processes=1)


def _banner(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _load(name: str, overrides: list[str]) -> Config:
    return load_config(REPO_CONFIGS / name, overrides)


def run_quickstart(out: str | Path, plan: Optional[QuickstartPlan] = None, threads: int = 0) -> dict[str, Any]:
    from ernie_vilg.runtime import configure_threads

    plan = plan or QuickstartPlan()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configure_threads(threads)
    timings: dict[str, float] = {}
    t_all = time.time()

    # 1. data ------------------------------------------------------------------------------
    data = out / "data"
    t0 = time.time()
    if not (data / "test.jsonl").is_file():
        from ernie_vilg.data.shapes import write_shapes_dataset

        _banner(f"1/6 shapes world: {plan.num_train} train / {plan.num_val} val / {plan.num_test} test images")
        write_shapes_dataset(data, plan.num_train, plan.num_val, plan.num_test, size=plan.image_size,
                             seed=plan.seed, min_objects=plan.min_objects, max_objects=plan.max_objects,
                             jitter=plan.jitter, progress=True)
    else:
        _banner("1/6 shapes world: already written")
    timings["data"] = time.time() - t0

    # 2. image tokenizer --------------------------------------------------------------------
    t0 = time.time()
    vq_cfg = _load(plan.vq_config, [
        f"Global.output_dir={out / 'vq'}", f"Global.seed={plan.seed}",
        f"Data.train_manifest={data / 'train.jsonl'}", f"Data.val_manifest={data / 'val.jsonl'}",
        f"Data.test_manifest={data / 'test.jsonl'}", f"Data.image_size={plan.image_size}",
        *plan.vq_overrides,
    ])
    vq_ckpt = _train_stage(vq_cfg, "2/6 image tokenizer", plan.vq_config)
    timings["tokenizer"] = time.time() - t0

    # 3. token shards -------------------------------------------------------------------------
    from ernie_vilg.vq.tokenize_images import tokenize_manifest

    t0 = time.time()
    _banner("3/6 tokenize images")
    for split in ("train", "val", "test"):
        if not (out / "tokens" / split / "info.json").is_file():
            summary = tokenize_manifest(vq_ckpt, data / f"{split}.jsonl", out / "tokens" / split)
            log.info("tokens/%s: %s", split, summary)
    timings["tokenize"] = time.time() - t0

    # 4. vocab ------------------------------------------------------------------------------
    from ernie_vilg.text.vocab import build_vocab

    vocab = out / "vocab.txt"
    if not vocab.is_file():
        _banner("4/6 text vocab")
        build_vocab([data / "train.jsonl", data / "val.jsonl"], vocab)

    # 5. ERNIE-ViLG --------------------------------------------------------------------------
    t0 = time.time()
    vilg_overrides = [
        f"Global.output_dir={out / plan.vilg_dir}", f"Global.seed={plan.seed}",
        f"Data.train_shards={out / 'tokens' / 'train'}", f"Data.val_shards={out / 'tokens' / 'val'}",
        f"Data.vocab_file={vocab}", f"Data.tokenizer_ckpt={vq_ckpt}", *plan.vilg_overrides,
    ]
    vilg_cfg = _load(plan.vilg_config, vilg_overrides)
    started = out / plan.vilg_dir / "started_at.txt"  # wall-clock origin of the convergence study
    if not started.is_file():
        started.parent.mkdir(parents=True, exist_ok=True)
        started.write_text(f"{time.time():.3f}\n", encoding="utf-8")
    vilg_ckpt = _train_stage(vilg_cfg, "5/6 ERNIE-ViLG", f"both directions, {plan.vilg_config}",
                             launch=(plan.vilg_config, vilg_overrides, plan.vilg_processes))
    timings["vilg"] = time.time() - t0

    # 6. evaluation -------------------------------------------------------------------------
    from ernie_vilg.generation.evaluate import evaluate_both_directions
    from ernie_vilg.pipeline import load_bundle

    t0 = time.time()
    best_of = f", text-to-image best-of-{plan.eval_candidates}" if plan.eval_candidates > 1 else ""
    _banner(f"6/6 evaluate both directions on {plan.eval_images} held-out test images{best_of}")
    eval_out = out / plan.eval_dir if plan.eval_dir else out
    metrics = evaluate_both_directions(load_bundle(vilg_ckpt), out / "tokens" / "test", eval_out, max_items=plan.eval_images,
                                       seed=plan.seed, num_candidates=plan.eval_candidates)
    timings["evaluate"] = time.time() - t0
    timings["total"] = time.time() - t_all
    result = {"metrics": metrics, "seconds": timings, "tokenizer_ckpt": str(vq_ckpt),
              "vilg_ckpt": str(vilg_ckpt), "plan": plan.__dict__}
    (eval_out / "metrics.json").write_text(json.dumps(result, ensure_ascii=False, indent=1, default=list),
                                      encoding="utf-8")
    return result


def _train_stage(cfg: Config, label: str, what: str,
                 launch: Optional[tuple[str, list[str], int]] = None) -> Path:
    """Train one stage with the Trainer unless its newest checkpoint already reached max_steps
    (a run stopped early, e.g. by Train.max_minutes, resumes from its checkpoint).

    `launch` = (config name, overrides, processes): with processes > 1 the stage runs as that many
    one-thread data-parallel processes (paddle.distributed.launch over gloo, the same global batch);
    if the launch fails, it says why and trains in this process instead."""
    from ernie_vilg.runtime import seed_everything
    from ernie_vilg.checkpoint_io import latest_checkpoint
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.trainer import Trainer

    root = Path(cfg.Global.output_dir) / "checkpoints"
    ckpt = latest_checkpoint(root)
    if ckpt is not None and _meta_step(ckpt) >= cfg.Train.max_steps:
        _banner(f"{label}: already trained")
        return ckpt
    if launch is not None and launch[2] > 1:
        _banner(f"{label} ({what}; {launch[2]} data-parallel processes x 1 thread)")
        if _launch_data_parallel(cfg, *launch):
            ckpt = latest_checkpoint(root)
            if ckpt is not None:  # fit() always ends with a save (also when max_minutes stops it)
                return ckpt
        log.warning("data-parallel launch failed (see %s): training in this process",
                    Path(cfg.Global.output_dir) / "launch_logs")
    else:
        _banner(f"{label} ({what})")
    seed_everything(cfg.Global.seed)
    module = prepare(cfg)
    Trainer(module.cfg, module).fit()
    ckpt = latest_checkpoint(root)
    assert ckpt is not None  # fit() always ends with a save
    return ckpt


def _launch_data_parallel(cfg: Config, config_name: str, overrides: list[str], processes: int) -> bool:
    """tools/train.py under paddle.distributed.launch: `processes` CPU ranks of one thread each.

    Stage 5 of the quickstart on the 2-core dev machine: 0.152 s per global batch-16 step with
    2 x 1 thread (docs/benchmarks.md, "Quickstart (session 7)"); session 6 measured 0.225 s for
    one process of 2 threads (Paddle's own threads speed this model up little: most of its kernels
    are single-threaded). Each rank takes batch_size / processes of the same global batch."""
    import os
    import socket
    import subprocess
    import sys

    if cfg.Data.batch_size % processes:
        log.warning("Data.batch_size %d is not divisible by %d processes", cfg.Data.batch_size, processes)
        return False
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logs = Path(cfg.Global.output_dir) / "launch_logs"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(processes),
           "--master", f"127.0.0.1:{port}", "--log_dir", str(logs), str(REPO_CONFIGS.parent / "tools" / "train.py"),
           "-c", str(REPO_CONFIGS / config_name)]
    for item in [*overrides, f"Distributed.dp_degree={processes}", "Distributed.sharding_degree=1",
                 "Global.num_threads=1", f"Data.batch_size={cfg.Data.batch_size // processes}"]:
        cmd += ["-o", item]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env)
    return proc.returncode == 0


def _meta_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / "meta.json").read_text(encoding="utf-8")).get("step", 0))
