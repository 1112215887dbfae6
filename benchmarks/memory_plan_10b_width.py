"""The memory planner against Paddle's CPU allocator at the 10B model's width (issue 19, item 3).

    python benchmarks/memory_plan_10b_width.py                      # 1 and 2 layers, every policy
    python benchmarks/memory_plan_10b_width.py --layers 1 --policies none

Each case builds `configs/vilg/ernie_vilg_10b.yaml` cut to 1 or 2 layers (hidden 4,096, 64 heads,
64 text + 1,024 image tokens per stream, block-wise sparse attention with the schedule of that
depth), micro batch 1, both directions, float32 (the CPU's only dtype), one process, in its own
subprocess so the allocator statistics start clean. AdamW's moments are created first (a step on
zero gradients: the measured step is then a steady-state step, like every step after the first),
and the peak of Paddle's CPU allocator ("Allocated": bytes of live tensors, not RSS) is taken over
one training step: forward of both directions, backward, gradient clipping, AdamW, clear_grad
(which keeps zeroed gradients, as the Trainer does). The planner (`training/memory_plan.plan`) is
asked for the same setting: stage 1, sharding 1, float32, the policy, micro batch 1.

Output: one JSON line per case, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "vilg", "ernie_vilg_10b.yaml")
MIB = 2 ** 20


def case_config(layers: int, policy: str, chunk: int, text_vocab: int, hidden: int = 4096):
    from ernie_vilg.config import load_config

    return load_config(CONFIG, [f"Model.hidden_size={hidden}", f"Model.num_heads={hidden // 64}",
        f"Model.num_layers={layers}", "Model.attention_impl=sparse_blockwise", f"Model.text_vocab_size={text_vocab}",
        "Global.device=cpu", "Distributed.sharding_degree=1", "Distributed.dp_degree=1",
        "Distributed.sharding_stage=1", "Distributed.offload=false", "Distributed.amp_dtype=float32",
        "Distributed.amp_level=O1", f"Distributed.recompute={policy}", "Distributed.recompute_every_k=2",
        "Distributed.accumulate_steps=1", "Data.batch_size=1", f"Train.loss_chunk_tokens={chunk}"])


def planned(cfg, adam: bool) -> dict[str, float]:
    from ernie_vilg.training.memory_plan import plan, setting_from_config, shape_from_config

    p = plan(shape_from_config(cfg), setting_from_config(cfg), 1, 1, chunk_tokens=cfg.Train.loss_chunk_tokens)
    out = dict(p.gpu)
    if not adam:  # the case ran without AdamW's moments (see --adam-max-layers)
        out["optimizer_states"] = 0.0
    return out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import paddle

    from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.runtime import configure_threads
    from ernie_vilg.training.trainer import build_optimizer

    configure_threads(args.threads)
    cfg = case_config(args.layers, args.policy, args.chunk, args.text_vocab, args.hidden or 4096)
    m = cfg.Model
    paddle.seed(0)
    model = ErnieViLG(m, recompute=args.policy, recompute_every_k=cfg.Distributed.recompute_every_k)
    model.train()
    optimizer = build_optimizer(model, cfg) if args.adam else None
    criterion = VilgCriterion(pad_id=0, chunk_tokens=args.chunk)
    rng = np.random.default_rng(0)
    text = paddle.to_tensor(rng.integers(5, m.text_vocab_size, (1, m.max_text_len)))
    image = paddle.to_tensor(rng.integers(0, m.image_vocab_size, (1, m.image_grid, m.image_grid)))
    stats = paddle.base.core
    # AdamW creates its moments at the first step: make them on zero gradients (cheap), so the
    # measured step is a steady-state one without paying for a second 10B-width step
    sum(p.sum() * 0.0 for p in model.parameters()).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.clear_grad()
    else:  # zeroed gradients stay allocated, as after the Trainer's clear_grad
        model.clear_gradients(set_to_zero=True)
    states = stats.host_memory_stat_current_value("Allocated", 0)
    stats.host_memory_stat_reset_peak_value("Allocated", 0)
    t0 = time.perf_counter()
    loss = bidirectional_loss(model, criterion, text, image)
    forward_peak = stats.host_memory_stat_peak_value("Allocated", 0)
    loss.total.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.clear_grad()
    else:
        model.clear_gradients(set_to_zero=True)
    seconds = time.perf_counter() - t0
    peak = stats.host_memory_stat_peak_value("Allocated", 0)
    params = sum(int(np.prod(p.shape)) for p in model.parameters()) * 4
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    return {"layers": args.layers, "policy": args.policy, "chunk": args.chunk, "adam": bool(args.adam),
            "hidden": m.hidden_size, "peak_rss_bytes": hwm, "step_seconds": seconds,
            "states_bytes": states, "param_bytes": params, "peak_bytes": peak, "forward_peak_bytes": forward_peak,
            "loss": float(loss.total)}


def probe(hidden: int, heads_list: list[int], impl: str) -> list[dict[str, Any]]:
    """Kept activation units of one block per layer kind (what `memory_plan.KIND_COSTS` and
    BLOCK_BASE_UNITS are fitted to): a block of the 10B streams (both directions, micro batch 1)
    at `hidden`, forward only, allocator bytes kept / (2 x 1,088 x hidden x 4). Over several head
    counts, units = base + copies x heads x stored_keys / hidden separates the two terms."""
    import paddle

    from ernie_vilg.models.sparse_masks import Direction, LayerKind, PairedLayout
    from ernie_vilg.models.transformer import Block, stream_layout
    from ernie_vilg.training.memory_plan import layer_units, stored_keys

    rows = []
    stats = paddle.base.core
    for heads in heads_list:
        m = case_config(4, "none", 0, 300, hidden).Model
        m.num_heads, m.attention_impl = heads, impl
        layout = PairedLayout(stream_layout(m, Direction.TXT2IMG), stream_layout(m, Direction.IMG2TXT))
        kinds = [LayerKind.DENSE] if impl == "dense" else [LayerKind.ROW, LayerKind.COLUMN, LayerKind.CONV]
        for kind in kinds:
            block = Block(m, kind)
            x = paddle.randn([2, m.max_text_len + m.image_grid ** 2, hidden])
            x.stop_gradient = False
            before = stats.host_memory_stat_current_value("Allocated", 0)
            y = block(x, layout)
            kept = (stats.host_memory_stat_current_value("Allocated", 0) - before) / (x.size * 4)
            rows.append({"impl": impl, "kind": kind.value, "hidden": hidden, "heads": heads, "kept_units": kept,
                         "stored_keys": stored_keys(m, kind), "planned_units": layer_units(m, kind)})
            del y, x, block
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="1,2")
    p.add_argument("--policies", default="none,attention_core,full,every_k")
    p.add_argument("--chunk", type=int, default=0, help="Train.loss_chunk_tokens (0 = plain logits)")
    p.add_argument("--text-vocab", type=int, default=18000, help="the 10B config's ERNIE vocab size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adam-max-layers", type=int, default=1,
                   help="AdamW's moments only up to this depth: 2 layers with moments need ~12 GiB (the "
                        "moments are static bytes the planner counts exactly; their absence is planned too)")
    p.add_argument("--hidden", type=int, default=0, help="a narrower width (heads scaled alike) for quick checks")
    p.add_argument("--save", default="", help="append each case's raw JSON to this file")
    p.add_argument("--render", default="", help="print the table of a --save file with today's planner, run nothing")
    p.add_argument("--probe", default="", help="comma-separated head counts: one block's kept units per kind "
                                                "at --hidden (default 1024), e.g. --probe 8,16,32")
    p.add_argument("--impl", default="sparse_blockwise", help="--probe: sparse_blockwise or dense")
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--adam", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.layers = int(args.layers)
        print(json.dumps(worker(args)))
        return
    if args.probe:
        from ernie_vilg.runtime import configure_threads

        configure_threads(args.threads)
        for row in probe(args.hidden or 1024, [int(x) for x in args.probe.split(",")], args.impl):
            print(json.dumps(row))
        return
    if args.render:
        with open(args.render) as fh:
            raw = [json.loads(line) for line in fh if line.strip()]
    else:
        raw = []
        for layers in [int(x) for x in args.layers.split(",")]:
            for policy in args.policies.split(","):
                if policy == "every_k" and layers < 2:
                    continue  # with k = 2 one layer is recomputed: the same as full
                adam = int(layers <= args.adam_max_layers)
                cmd = [sys.executable, __file__, "--worker", "--layers", str(layers), "--policy", policy,
                       "--chunk", str(args.chunk), "--text-vocab", str(args.text_vocab), "--threads",
                       str(args.threads), "--adam", str(adam), "--hidden", str(args.hidden)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                got = json.loads(out.stdout.strip().splitlines()[-1])
                if args.save:
                    with open(args.save, "a") as fh:
                        fh.write(json.dumps(got) + "\n")
                raw.append(got)
    rows = []
    for got in raw:
        cfg = case_config(got["layers"], got["policy"], got["chunk"], args.text_vocab, got.get("hidden", 4096))
        plan = planned(cfg, got.get("adam", True))
        got["planned"] = plan
        got["planned_total"] = sum(plan.values())
        got["planned_activations"] = plan["activations"] + plan["logits"]
        got["measured_activations"] = got["peak_bytes"] - got["states_bytes"]
        got["error_total"] = got["planned_total"] / got["peak_bytes"] - 1
        got["error_activations"] = got["planned_activations"] / got["measured_activations"] - 1
        print(json.dumps(got), flush=True)
        rows.append(got)
    print("\n| layers | recompute | AdamW | step s | measured peak MiB | planned MiB | error | measured step activations MiB"
          " | planned activations + logits MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['policy']} | {'yes' if r.get('adam', True) else 'no'} | {r['step_seconds']:.0f} | {r['peak_bytes'] / MIB:,.0f} | "
              f"{r['planned_total'] / MIB:,.0f} | {100 * r['error_total']:+.1f} % | "
              f"{r['measured_activations'] / MIB:,.0f} | {r['planned_activations'] / MIB:,.0f} | "
              f"{100 * r['error_activations']:+.1f} % |")


if __name__ == "__main__":
    main()
