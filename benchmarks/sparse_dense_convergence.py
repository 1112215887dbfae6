"""Sparse vs dense attention: pre-training loss curves of both directions over seeds, one PNG.

    # the runs (benchmarks/recipe_ablation.py; one process of one thread each, two at a time)
    for seed in 0 1 2; do for impl in dense sparse_blockwise; do
      python benchmarks/recipe_ablation.py --qs QS --name conv_${impl}_s$seed --processes 1 --threads 1 \
        -o Train.max_steps=1500 Train.max_minutes=0 Train.eval_every=1500 Train.save_every=1500 \
           Train.log_every=50 Model.attention_impl=$impl Global.seed=$seed
    done; done
    # the figure and the table
    python benchmarks/sparse_dense_convergence.py --qs QS --out docs/sparse_dense

Reads QS/exp_conv_{impl}_s{seed}/log.jsonl (train losses every 50 steps, step times) and
QS/eval_conv_{impl}_s{seed}/ablation.json (the quickstart's evaluation at the end). Writes OUT.png
(text-to-image and image-to-text train loss against steps: mean over seeds, min-max band) and
OUT.md (the end-of-run table: losses, judge, BLEU@4, step time, mean and spread over seeds).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

IMPLS = ("dense", "sparse_blockwise")


def _curves(log: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train" and "loss_txt2img" in r]
    return {"step": np.array([r["step"] for r in train]),
            "txt2img": np.array([r["loss_txt2img"] for r in train]),
            "img2txt": np.array([r["loss_img2txt"] for r in train]),
            "step_time": np.array([r.get("step_time", np.nan) for r in train])}


def _spread(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.2f} ({a.min():.2f}-{a.max():.2f})" if len(a) > 1 else f"{a.mean():.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qs", required=True, type=Path, help="the quickstart folder the runs were made in")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", required=True, help="output prefix: OUT.png, OUT.md")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for impl in IMPLS:
        for seed in seeds:
            log = args.qs / f"exp_conv_{impl}_s{seed}" / "log.jsonl"
            result = args.qs / f"eval_conv_{impl}_s{seed}" / "ablation.json"
            if not log.is_file() or not result.is_file():
                print(f"skipping {impl} seed {seed}: {log if not log.is_file() else result} missing", file=sys.stderr)
                continue
            runs[impl].append({"seed": seed, **_curves(log), "result": json.loads(result.read_text(encoding="utf-8"))})
    if not all(runs.values()):
        print("error: need at least one finished run of each core", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("txt2img", "img2txt"), ("text-to-image", "image-to-text")):
        for impl, colour in zip(IMPLS, ("tab:blue", "tab:orange")):
            n = min(len(r["step"]) for r in runs[impl])
            steps = runs[impl][0]["step"][:n]
            stack = np.stack([r[key][:n] for r in runs[impl]])
            ax.plot(steps, stack.mean(0), color=colour, label=f"{impl} ({len(stack)} seeds)")
            ax.fill_between(steps, stack.min(0), stack.max(0), color=colour, alpha=0.25)
        ax.set_yscale("log")
        ax.set_xlabel("step (batch 16)")
        ax.set_ylabel("train loss, nats per token")
        ax.set_title(f"{title} loss")
        ax.legend()
    fig.suptitle("Sparse (row/row/column/conv) vs dense attention, both directions, shapes quickstart")
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)

    keys = ("shape", "colour", "position", "count", "all")
    lines = ["| core | seeds | t2i loss at end | i2t loss at end | " + " | ".join(f"one sample {k}" for k in keys)
             + " | best of 8 all | BLEU@4 | s/step |", "|" + "---|" * (8 + len(keys))]
    for impl in IMPLS:
        rs = runs[impl]
        last = lambda key: [float(np.mean(r[key][-2:])) for r in rs]  # noqa: E731  (mean of the last two logs)
        lines.append(f"| {impl} | {len(rs)} | {_spread(last('txt2img'))} | {_spread(last('img2txt'))} | "
                     + " | ".join(_spread([r['result']['single'][k] for r in rs]) for k in keys)
                     + f" | {_spread([r['result']['best_of_8']['all'] for r in rs])}"
                     + f" | {_spread([r['result']['bleu4'] for r in rs])}"
                     + f" | {_spread([float(np.nanmean(r['step_time'])) for r in rs])} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
