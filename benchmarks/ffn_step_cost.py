"""Training-step time of the quickstart model with each feed-forward variant, side by side.

    OMP_NUM_THREADS=1 python benchmarks/ffn_step_cost.py --threads 1 --rounds 5 --steps 5

configs/vilg/shapes.yaml's model (dense core, 6 x 6 image grid, hidden 128, 4 layers), batch 16,
40 text tokens (a typical quickstart batch: texts pad to the batch's longest), random tokens, both
directions, AdamW. The variants (GELU at 4d, GEGLU at 4d, GEGLU at 3d, GEGLU + LayerScale) are
built in one process and timed alternately, round by round, so load hits them alike; the table
gives the median seconds per step and the ratio to GELU.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "gelu 4d": ["Model.ffn_act=gelu"],
    "geglu 4d": ["Model.ffn_act=geglu"],
    "geglu 3d": ["Model.ffn_act=geglu", "Model.ffn_mult=3"],
    "geglu 4d + layerscale": ["Model.ffn_act=geglu", "Model.layer_scale_init=0.1"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    args = p.parse_args()

    import ernie_vilg  # noqa: F401  (runtime flags before paddle loads)
    import paddle

    from ernie_vilg.config import load_config
    from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.runtime import configure_threads
    from ernie_vilg.training.trainer import build_optimizer

    configure_threads(args.threads)
    rng = np.random.default_rng(0)
    text_np = rng.integers(5, 700, (16, 40))
    text_np[:, 0] = 1
    text, image = paddle.to_tensor(text_np), paddle.to_tensor(rng.integers(0, 512, (16, 6, 6)))
    steps = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(os.path.join(HERE, "..", "configs", "vilg", "shapes.yaml"),
                          ["Model.text_vocab_size=700", "Model.image_vocab_size=512", "Model.image_grid=6",
                           "Model.max_text_len=64", "Model.attention_impl=dense", *overrides])
        paddle.seed(0)
        model = ErnieViLG(cfg.Model)
        optimizer = build_optimizer(model, cfg)

        def step(model=model, optimizer=optimizer, criterion=VilgCriterion(pad_id=0)) -> None:
            bidirectional_loss(model, criterion, text, image).total.backward()
            optimizer.step()
            optimizer.clear_grad()

        step(), step()  # warm-up
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = float(np.median(times["gelu 4d"]))
    print(f"\n| feed-forward ({args.threads} thread(s)) | s/step | vs GELU 4d |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {np.median(values):.3f} | {np.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
