"""Checkpoint save / load: the sharded safetensors layout against the older pickle layout.

    python benchmarks/checkpoint_io.py --out /tmp/ckpt_bench [--rounds 2]

For each model (tiny, shapes, and the lite 300M width at 2 layers, so that tensors are large
enough for host memory to show) with its AdamW state after one step, and for 1 and 2
data-parallel ranks, it writes one checkpoint the way each layout does and reads it back:

- pickle (before): the committing rank pickles the whole model and the whole optimizer state
  (`paddle.save`, which converts every tensor to a host array first); every rank loads all of it
  (`safe_load`: unpickled once to check the allow-list, once by `paddle.load`);
- sharded: every rank writes its part of the names, one tensor in host memory at a time
  (`checkpoint_io.write_partition`); loading streams the weights into the model one tensor at a
  time (`load_weights_into`) and reads the optimizer state once (`read_sharded`).

Loading ends, in both layouts, with the weights in the model and the optimizer state as a dict
(what a resume hands to the optimizer).

Each measurement runs in a fresh process that builds the same seeded state, so what a save or a
load adds is measured alone: peak host memory is the largest resident size sampled every 0.5 ms
during the operation minus the resident size before it (the model and optimizer, which every
rank holds anyway). The children run with glibc's MALLOC_MMAP_THRESHOLD_=65536 and
MALLOC_TRIM_THRESHOLD_=0, so large blocks are mapped and unmapped and the resident size follows
what is alive (by default the package keeps freed memory for reuse, which would hide a save's
buffers in pages the model build freed). Ranks of a data-parallel job hold the same replicated
state, so each rank of the 2-rank case is its own child. The layouts alternate within each
round; the table gives medians over rounds (peak: the largest rank).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
QUICKSTART_SIZES = ["Model.text_vocab_size=64", "Model.image_vocab_size=512", "Model.image_grid=6"]
PAPER_SIZES = ["Model.text_vocab_size=8000", "Model.image_vocab_size=8192", "Model.image_grid=32"]
MODELS = {
    "tiny": ("configs/vilg/tiny.yaml", QUICKSTART_SIZES),
    "shapes": ("configs/vilg/shapes.yaml", QUICKSTART_SIZES),
    "lite width 2 layers": ("configs/vilg/lite_300m.yaml", PAPER_SIZES + ["Model.num_layers=2"]),
}


def measure(fn: Callable[[], Any]) -> tuple[float, int]:
    """(seconds, peak resident bytes above the resident size before `fn`), RSS sampled by a thread."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    before, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak[0] = max(peak[0], rss())
    done.set()
    sampler.join()
    del result
    return seconds, max(0, peak[0] - before)


def build(config: str, overrides: list[str]) -> tuple[Any, dict[str, Any], int]:
    import paddle

    from ernie_vilg.config import load_config
    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.training.checkpoint import optimizer_state_to_structured

    cfg = load_config(str(HERE.parent / config), overrides)
    paddle.seed(0)
    model = ErnieViLG(cfg.Model)
    opt = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
    loss = sum(p.sum() for p in model.parameters())  # one step: the moments exist
    loss.backward()
    opt.step()
    largest = max(int(p.numel()) * p.element_size() for p in model.parameters())
    return model, optimizer_state_to_structured(opt.state_dict(), model), largest


def child(args: argparse.Namespace) -> None:
    """One measurement: build the state, then save this rank's part or load the folder."""
    import paddle

    from ernie_vilg.checkpoint_io import (
        OPTIMIZER_PREFIX, WEIGHTS_PREFIX, load_weights_into, read_sharded, state_bytes, write_index, write_partition,
    )
    from ernie_vilg.safe_pickle import safe_load

    layer, opt, largest = build(*MODELS[args.model])
    model = layer.state_dict()
    folder = Path(args.folder)
    if args.op == "save" and args.layout == "pickle":  # the committing rank writes everything
        fn = (lambda: (paddle.save(model, str(folder / "model.pdparams")),
                       paddle.save(opt, str(folder / "optimizer.pdopt")))) if args.rank == 0 else (lambda: None)
    elif args.op == "save":
        def fn() -> None:
            write_partition(folder, WEIGHTS_PREFIX, model, args.rank, args.world)
            write_partition(folder, OPTIMIZER_PREFIX, opt, args.rank, args.world)
    elif args.layout == "pickle":  # weights into the model, optimizer state as a dict (what resume does)
        fn = lambda: (layer.set_state_dict(safe_load(folder / "model.pdparams")),  # noqa: E731
                      safe_load(folder / "optimizer.pdopt"))
    else:
        fn = lambda: (load_weights_into(layer, folder), read_sharded(folder, OPTIMIZER_PREFIX))  # noqa: E731
    seconds, peak = measure(fn)
    if args.op == "save" and args.layout == "sharded" and args.rank == args.world - 1:
        write_index(folder, WEIGHTS_PREFIX)  # after the measurement: the committing rank's step
        write_index(folder, OPTIMIZER_PREFIX)
    print(json.dumps({"seconds": seconds, "peak": peak, "state": state_bytes(model) + state_bytes(opt),
                      "largest": largest}))


def run_child(**kw: Any) -> dict[str, Any]:
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "MKL_DEBUG_CPU_TYPE": "5", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if proc.returncode:
        raise SystemExit(f"child {kw} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ckpt_bench", help="scratch folder (removed between measurements)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--op", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    if args.child:
        child(args)
        return
    scratch = Path(args.out)
    rows = []
    for name in args.models.split(","):
        for world in (1, 2):
            results: dict[str, dict[str, list[float]]] = {"pickle": {}, "sharded": {}}
            info: dict[str, Any] = {}
            for _ in range(args.rounds):
                for layout in ("pickle", "sharded"):
                    shutil.rmtree(scratch, ignore_errors=True)
                    scratch.mkdir(parents=True)
                    saves = [run_child(model=name, layout=layout, op="save", rank=rank, world=world, folder=scratch)
                             for rank in range(world)]
                    load = run_child(model=name, layout=layout, op="load", rank=0, world=world, folder=scratch)
                    info = saves[0]
                    r = results[layout]
                    r.setdefault("save_s", []).append(max(x["seconds"] for x in saves))
                    r.setdefault("save_peak", []).append(max(x["peak"] for x in saves))
                    r.setdefault("load_s", []).append(load["seconds"])
                    r.setdefault("load_peak", []).append(load["peak"])
            for layout, r in results.items():
                row = {"model": name, "ranks": world, "layout": layout, "state_mb": info["state"] / 2 ** 20,
                       "largest_tensor_mb": info["largest"] / 2 ** 20,
                       **{k: statistics.median(v) for k, v in r.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print("\n| model | ranks | layout | weights + optimizer MB | largest tensor MB | save s (slowest rank) | "
          "save peak host MB (largest rank) | load s | load peak host MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ranks']} | {r['layout']} | {r['state_mb']:.1f} | {r['largest_tensor_mb']:.1f} | "
              f"{r['save_s']:.3f} | {r['save_peak'] / 2 ** 20:.1f} | {r['load_s']:.3f} | {r['load_peak'] / 2 ** 20:.1f} |")


if __name__ == "__main__":
    main()
