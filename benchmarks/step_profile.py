"""Where the time of one bidirectional training step goes, by Paddle operator (paddle.profiler, CPU).

    python benchmarks/step_profile.py --threads 1 [--steps 5] [--top 14]

The step is the vilg stage's (configs/vilg/shapes.yaml's model, batch 16, 64 text + 8 x 8 image
tokens, both directions, AdamW), on random tokens. It prints the forward / backward / optimizer
split (wall time, averaged over --steps) and the operators with the largest CPU time per step
("X dygraph" = forward kernel, "Global_XGradNode" = its backward). Written against functions that
existed before this session's speed work, so `PYTHONPATH=OLD_CHECKOUT python
benchmarks/step_profile.py` profiles an older checkout the same way (docs/benchmarks.md,
"Training step profile").
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROW = re.compile(r"^\s*(\S+(?: dygraph)?)\s+(\d+)\s+([\d.]+) / ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--impl", default="", help="Model.attention_impl (default: the checkout's shapes.yaml)")
    args = p.parse_args()

    import ernie_vilg  # noqa: F401  (runtime flags before paddle loads)
    import paddle
    import paddle.profiler as profiler

    from ernie_vilg.config import load_config
    from ernie_vilg.models import losses
    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.runtime import configure_threads
    from ernie_vilg.training.trainer import build_optimizer

    configure_threads(args.threads)
    # the configs of the checkout whose package is imported (an older one has older keys)
    configs = os.path.join(os.path.dirname(os.path.dirname(ernie_vilg.__file__)), "configs")
    cfg = load_config(os.path.join(configs, "vilg", "shapes.yaml"),
                      ["Model.text_vocab_size=700", "Model.image_vocab_size=512", f"Model.image_grid={args.grid}"]
                      + ([f"Model.attention_impl={args.impl}"] if args.impl else []))
    paddle.seed(0)
    model = ErnieViLG(cfg.Model)
    optimizer = build_optimizer(model, cfg)
    criterion = losses.VilgCriterion(0)
    rng = np.random.default_rng(0)
    text = paddle.to_tensor(rng.integers(5, 700, (16, 64)))
    image = paddle.to_tensor(rng.integers(0, 512, (16, args.grid, args.grid)))

    def loss():
        if hasattr(losses, "bidirectional_loss"):  # the step as the vilg stage runs it today
            return losses.bidirectional_loss(model, criterion, text, image).total
        return criterion(model(text, image, "txt2img"), image, model(text, image, "img2txt"), text).total

    for _ in range(3):
        loss().backward(), optimizer.step(), optimizer.clear_grad()
    split = np.zeros(3)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        value = loss()
        float(value)
        t1 = time.perf_counter()
        value.backward()
        t2 = time.perf_counter()
        optimizer.step(), optimizer.clear_grad()
        split += (t1 - t0, t2 - t1, time.perf_counter() - t2)
    split /= args.steps
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU])
    prof.start()
    for _ in range(args.steps):
        loss().backward(), optimizer.step(), optimizer.clear_grad()
        prof.step()
    prof.stop()
    text_out = io.StringIO()
    with contextlib.redirect_stdout(text_out):
        prof.summary(sorted_by=profiler.SortedKeys.CPUTotal, op_detail=False, thread_sep=False, time_unit="ms")
    ops = []
    for line in text_out.getvalue().splitlines():
        m = ROW.match(line)
        if m and (m.group(1).endswith("dygraph") or m.group(1).startswith("Global_")) \
                and not m.group(1).startswith("Global_GradNodeAccumulation"):
            ops.append((m.group(1), int(m.group(2)) / args.steps, float(m.group(3)) / args.steps))
    ops.sort(key=lambda o: -o[2])
    out = {"package": os.path.dirname(ernie_vilg.__file__), "threads": args.threads, "impl": cfg.Model.attention_impl,
           "forward_s": split[0], "backward_s": split[1], "optimizer_s": split[2], "step_s": float(split.sum()),
           "top_ops_ms_per_step": [{"op": o, "calls": c, "ms": round(ms, 2)} for o, c, ms in ops[:args.top]]}
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
