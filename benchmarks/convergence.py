"""Convergence of text-to-image on the shapes world: the judge against steps and wall time.

    # 1. train the long recipe (a checkpoint every Train.save_every steps, all kept)
    python tools/quickstart.py --out QS --long            # or: QS from a finished quickstart, then
    # 2. judge every checkpoint on the held-out test captions, one sample each; table + PNG plot
    python benchmarks/convergence.py --run QS/vilg_long --shards QS/tokens/test --out docs/convergence

Step 2 reads each checkpoint's step and the wall time since the run's first step from its
meta.json / trainer state (the time of the save minus the run's start, so evaluation time is not
counted), samples one image per test caption with the checkpoint's Generation settings (guidance
`Generation.cfg_scale` included), judges it with the shapes judge, and scores greedy captions. It
writes OUT.json, OUT.md (table) and OUT.png (judge per attribute against steps and minutes).
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ATTRS = ("shape", "colour", "position", "size", "count", "all")


def _saved_at(ckpt: Path) -> float:
    meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    return datetime.fromisoformat(meta["time"]).timestamp()


def judge_checkpoints(run: Path, shards: Path, max_items: int, seed: int, start: float | None,
                      pauses: list[tuple[float, float]] = (), cfg_scale: float | None = None) -> list[dict[str, Any]]:
    import paddle

    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.generation.evaluate import caption_direction, image_direction
    from ernie_vilg.pipeline import load_bundle
    from ernie_vilg.checkpoint_io import list_checkpoints

    ckpts = list_checkpoints(run / "checkpoints") if (run / "checkpoints").is_dir() else list_checkpoints(run)
    if not ckpts:
        raise SystemExit(f"no checkpoints under {run}")
    test = TokenShards(shards)
    records = [test[i] for i in range(min(max_items, len(test)))]
    # the run's start: the first checkpoint's save time minus its steps at the first interval's rate
    # is unknowable exactly; the trainer log is not required, so --start (epoch seconds) or
    # run/started_at.txt (written by the quickstart) is used when present, else the first save
    if start is None:
        marker = run / "started_at.txt"
        start = float(marker.read_text()) if marker.is_file() else _saved_at(ckpts[0])
    rows = []
    for ckpt in ckpts:
        bundle = load_bundle(ckpt)
        step = int(json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))["step"])
        t0 = time.time()
        with paddle.no_grad():
            judge, _ = image_direction(bundle.model, bundle.text_tokenizer, bundle.image_tokenizer, records,
                                       bundle.cfg, seed=seed, cfg_scale=cfg_scale)
            captions, _ = caption_direction(bundle.model, bundle.text_tokenizer, records, bundle.cfg)
        saved = _saved_at(ckpt)
        paused = sum(seconds for at, seconds in pauses if at < saved)  # the run was stopped meanwhile
        row = {"step": step, "minutes": (saved - start - paused) / 60, "eval_seconds": time.time() - t0,
               **{a: judge.get(f"judge_{a}", float("nan")) for a in ATTRS},
               "caption_BLEU-4": captions.get("caption_BLEU-4"), "caption_CIDEr": captions.get("caption_CIDEr")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "step", "training steps"), (axes[1], "minutes", "wall minutes (training)")):
        for attr in ATTRS:
            ax.plot([r[key] for r in rows], [100 * r[attr] for r in rows], marker="o", ms=3, label=attr)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("judge accuracy, one sample per caption (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="vilg run folder (with checkpoints/) of the long recipe")
    p.add_argument("--shards", required=True, help="held-out token shards (QS/tokens/test)")
    p.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.md, OUT.png")
    p.add_argument("--max-items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=float, default=None, help="the run's start (epoch seconds)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--pause", action="append", default=[], metavar="EPOCH:SECONDS",
                   help="the run was stopped (SIGSTOP) at EPOCH for SECONDS: not counted as training time")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: each checkpoint's)")
    p.add_argument("--title", default="text-to-image on the shapes world (configs/vilg/shapes_long.yaml)")
    args = p.parse_args()
    import ernie_vilg  # noqa: F401  (runtime flags before paddle loads)
    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    try:
        pauses = [(float(a), float(b)) for a, b in (item.split(":") for item in args.pause)]
    except ValueError:
        raise SystemExit(f"--pause takes EPOCH:SECONDS, got {args.pause}")
    rows = judge_checkpoints(Path(args.run), Path(args.shards), args.max_items, args.seed, args.start, pauses,
                             args.cfg_scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    lines = ["| step | minutes | " + " | ".join(ATTRS) + " | caption BLEU-4 | CIDEr |",
             "|---" * (len(ATTRS) + 4) + "|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['minutes']:.1f} | " + " | ".join(f"{100 * r[a]:.1f}" for a in ATTRS)
                     + f" | {r['caption_BLEU-4']:.1f} | {r['caption_CIDEr']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(rows, out.with_suffix(".png"), args.title)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
