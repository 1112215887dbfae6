"""Check the memory planner against a real 2-process sharding-stage-1 run (CPU, gloo).

    python benchmarks/memory_plan_check.py [--out /tmp/mem_check] [--hidden 64 --layers 4]
    python benchmarks/memory_plan_check.py --run RUN_DIR      # only compare an existing run

Trains the tiny bidirectional config for 2 steps with `paddle.distributed.launch
--nproc_per_node 2` and `Distributed.sharding_degree=2`, then compares what each rank held
after its first step (`RUN/memory/rank-*.json`: parameter bytes, optimizer-state bytes) with
`ernie_vilg.training.memory_plan`. Prints a markdown table; exit 1 if an error exceeds 10%.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch_run(out: Path, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from vilg_fixture import write_tiny_vilg_data  # the tests' tiny token-shard dataset

    data = write_tiny_vilg_data(out / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = out / "run"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--master",
           f"127.0.0.1:{port}", "--log_dir", str(out / "logs"), str(REPO / "tools" / "train.py"),
           "-c", str(REPO / "configs" / "vilg" / "tiny.yaml")]
    for o in data + [f"Global.output_dir={run}", "Train.max_steps=2", "Train.eval_every=0", "Train.progress_bar=false",
                     "Distributed.sharding_degree=2", "Distributed.accumulate_steps=2", f"Model.hidden_size={hidden}",
                     f"Model.num_layers={layers}"]:
        cmd += ["-o", o]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="compare an existing run instead of launching one")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ernie_vilg_memory_check"))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    run = args.run or launch_run(args.out, args.hidden, args.layers)
    from ernie_vilg.training.memory_plan import compare_with_measured

    rows = compare_with_measured(run)
    print("| rank | params measured | params planned | error | optimizer states measured | planned | error |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in rows:
        print(f"| {r['rank']} | {r['param_bytes']:,} | {r['planned_param_bytes']:,.0f} | {r['param_error']:+.2%} | "
              f"{r['optimizer_bytes']:,} | {r['planned_optimizer_bytes']:,.0f} | {r['optimizer_error']:+.2%} |")
        worst = max(worst, abs(r["param_error"]), abs(r["optimizer_error"]))
    print(f"worst error {worst:.2%} ({'within' if worst <= 0.10 else 'OUTSIDE'} 10%)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
