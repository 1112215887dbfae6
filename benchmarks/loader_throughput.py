"""Throughput of the streaming token loader (samples/s), next to one training step of the model.

    python benchmarks/loader_throughput.py --rows 100000 --grid 8 --batch-size 32 \
        [--step-config configs/vilg/shapes.yaml]

Builds a synthetic shard folder (random ids, short Chinese texts with 5 references, like the
shapes world) in a temporary folder, times whole epochs of `StreamingTokenLoader` (shuffle
buffer on, as in training), and -- when the config and the model exist -- times a training step
(forward both directions, backward, AdamW) of that config's ERNIE-ViLG on batches of the same
shape. Prints one JSON object; the lines for docs/benchmarks.md go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ernie_vilg.data.streaming import StreamingTokenLoader
from ernie_vilg.data.token_shards import TokenShardWriter

REPO = Path(__file__).resolve().parents[1]


def build_folder(out: Path, rows: int, grid: int, codebook: int, shard_size: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    w = TokenShardWriter(out, grid, codebook, shard_size=shard_size)
    for i in range(rows):
        texts = [f"图中有{i % 3 + 1}个物体，红色的圆形在左上角，第{i}号" + "的" * (i % 5) for _ in range(5)]
        w.add(rng.integers(0, codebook, size=(grid, grid)), texts[0], texts, {"image": f"images/{i:07d}.png"})
    w.close()
    return time.perf_counter() - t0


def time_loader(path: Path, batch_size: int, buffer_size: int, samples: int, rank: int = 0,
                world_size: int = 1) -> dict[str, float]:
    loader = StreamingTokenLoader(path, batch_size, seed=0, rank=rank, world_size=world_size,
                                  buffer_size=buffer_size, random_text=True)
    it = iter(loader)
    t0 = time.perf_counter()
    first = next(it)  # includes filling the shuffle buffer
    t_first = time.perf_counter() - t0
    n = len(first["index"])
    while n < samples:
        n += len(next(it)["index"])
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt, "first_batch_s": t_first,
            "batch_ms": 1000 * dt / (n / batch_size)}


def time_train_step(config: Path, batch_size: int, grid: int, iters: int) -> Optional[dict[str, Any]]:
    """Seconds per training step of the config's model on random batches (None if unavailable)."""
    try:
        import paddle

        from ernie_vilg.config import load_config
        from ernie_vilg.models.losses import VilgCriterion
        from ernie_vilg.models.sparse_masks import Direction
        from ernie_vilg.models.transformer import ErnieViLG
        from ernie_vilg.training.trainer import build_optimizer
    except ImportError as exc:
        return {"unavailable": f"model not importable ({exc})"}
    if not config.is_file():
        return {"unavailable": f"{config} not found"}
    cfg = load_config(config, [f"Data.batch_size={batch_size}"])
    m = cfg.Model
    m.text_vocab_size = m.text_vocab_size or 400  # the shapes vocab is a few hundred tokens
    m.image_vocab_size = m.image_vocab_size or 512
    m.image_grid = m.image_grid or grid
    paddle.seed(0)
    model = ErnieViLG(m)
    opt = build_optimizer(model, cfg)
    crit = VilgCriterion(0)
    rng = np.random.default_rng(0)
    text = paddle.to_tensor(rng.integers(5, m.text_vocab_size, size=(batch_size, m.max_text_len)))
    image = paddle.to_tensor(rng.integers(0, m.image_vocab_size, size=(batch_size, m.image_grid, m.image_grid)))

    def step() -> None:
        loss = crit(model(text, image, Direction.TXT2IMG), image, model(text, image, Direction.IMG2TXT), text)
        loss.total.backward()
        opt.step()
        opt.clear_grad()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    dt = (time.perf_counter() - t0) / iters
    return {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
            "batch_size": batch_size, "step_s": dt, "model_samples_per_s": batch_size / dt,
            "model": f"{m.num_layers} layers, hidden {m.hidden_size}, text {m.max_text_len} + image {m.image_grid}x{m.image_grid}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100000)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--codebook", type=int, default=8192)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buffer-size", type=int, default=10000)
    p.add_argument("--world-size", type=int, default=2, help="also time rank 0 of this many ranks")
    p.add_argument("--step-config", default=str(REPO / "configs" / "vilg" / "shapes.yaml"))
    p.add_argument("--step-iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="Paddle CPU threads for the step timing")
    p.add_argument("--workdir", default="", help="where to build the shards (default: a temp folder)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        folder = Path(tmp) / "shards"
        build_s = build_folder(folder, args.rows, args.grid, args.codebook, args.shard_size)
        one = time_loader(folder, args.batch_size, args.buffer_size, args.rows)
        ranked = time_loader(folder, args.batch_size, args.buffer_size, args.rows // args.world_size, 0,
                             args.world_size)
    step = None
    if args.step_config:
        try:
            import paddle

            paddle.base.core.set_num_threads(args.threads)
        except ImportError:
            pass
        step = time_train_step(Path(args.step_config), args.batch_size, args.grid, args.step_iters)
    result = {
        "rows": args.rows, "grid": args.grid, "batch_size": args.batch_size, "buffer_size": args.buffer_size,
        "build_folder_s": build_s, "loader_1_rank": one, f"loader_rank0_of_{args.world_size}": ranked,
        "train_step": step,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, load avg "
                   + " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "",
    }
    if step and "step_s" in step:
        loader_batch_s = one["batch_ms"] / 1000
        result["loader_share_of_step"] = loader_batch_s / (loader_batch_s + step["step_s"])
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
