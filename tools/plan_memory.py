"""Per-GPU memory plan of a config on a cluster, and the settings that make it fit.

    python tools/plan_memory.py -c configs/vilg/ernie_vilg_10b.yaml --nodes 4 --gpus-per-node 8 --gpu-mem 32
    python tools/plan_memory.py -c CONFIG --topology-only --nodes 2 --gpus-per-node 8   # for fleet_launch/

Exit code 0 if the config's own setting fits, 1 if it does not, 2 on a config error.
"""
from __future__ import annotations

import argparse
import sys

from ernie_vilg.cli.common import add_config_args, load_config_or_exit
from ernie_vilg.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, default=32.0, help="GB per GPU (e.g. 32 for V100-32G, 80 for A100)")
    parser.add_argument("--cpu-mem", type=float, default=0.0, help="GB host memory per node (0 = do not check)")
    parser.add_argument("--sharding-degree", type=int, default=0, help="override the config's sharding degree")
    parser.add_argument("--topology-only", action="store_true",
                        help="print the resolved dp x sharding layout and global batch, check it, and exit")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(args.config, args.override)
    try:
        if args.topology_only:
            from ernie_vilg.training.distributed import Topology, global_batch_size, validate

            world = args.nodes * args.gpus_per_node
            for warning in validate(cfg, world, "gpu" if cfg.Global.device == "gpu" else "cpu", args.gpus_per_node):
                print(f"warning: {warning}")
            d = cfg.Distributed
            topo = Topology(world, 0, d.dp_degree, d.sharding_degree, d.sharding_stage, cfg.Global.device)
            print(topo.describe())
            print(f"  global batch {global_batch_size(cfg)} = micro {cfg.Data.batch_size // d.accumulate_steps} x "
                  f"accumulation {d.accumulate_steps} x dp {d.dp_degree} x sharding {d.sharding_degree}; "
                  f"offload {d.offload}, recompute {d.recompute}, amp {d.amp_dtype} {d.amp_level}")
            return 0
        from ernie_vilg.training.memory_plan import report

        text, fits = report(cfg, args.nodes, args.gpus_per_node, args.gpu_mem, args.cpu_mem,
                            sharding_degree=args.sharding_degree)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
