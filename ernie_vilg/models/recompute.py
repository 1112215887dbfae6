"""Activation recomputation, decided in one place: the transformer's block loop.

    for i, block in enumerate(self.blocks):
        x = recompute_block(block, policy, i, x, layout, None, every_k=k)

Policies (Distributed.recompute):
    none            keep every activation
    full            recompute every block in backward (keeps only each block's input)
    every_k         recompute blocks whose index is a multiple of `every_k`
    attention_core  recompute the attention sub-layer of every block (LayerNorm, QKV, the
                    softmax(QK^T)V core with its [B, heads, T, keys] scores, output projection)
                    and keep the MLP's activations. The scores are the part of a block whose
                    memory grows with the sequence length squared, so this removes most of the
                    activation memory at the cost of recomputing one matmul-light sub-layer.
                    Blocks must expose `attention_residual(x, *rest)` (x + attn(ln1(x))) and
                    `mlp_residual(x)` (x + mlp(ln2(x))) so that attention layers themselves
                    know nothing about recompute.

Paddle's non-reentrant recompute is used (`use_reentrant=False`): it works with a first input
that does not require grad (the reentrant one silently drops parameter gradients then) and
needs no manual `no_sync` + all-reduce under DataParallel. RNG state (dropout) is replayed.
"""
from __future__ import annotations

from typing import Any

import paddle

POLICIES = ("none", "full", "every_k", "attention_core")


def should_recompute(policy: str, layer_index: int, every_k: int = 2) -> bool:
    """Whether the whole block `layer_index` is recomputed under `policy` (not attention_core)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown recompute policy {policy!r} (known: {', '.join(POLICIES)})")
    if policy == "full":
        return True
    if policy == "every_k":
        return layer_index % max(1, every_k) == 0
    return False


def _active() -> bool:
    # recompute only pays off with a graph to replay; under no_grad it is a no-op. The
    # non-reentrant implementation also handles inputs that need no grad (parameters still get
    # theirs), so the input's stop_gradient is not checked here.
    return paddle.is_grad_enabled()


def recompute_block(block: paddle.nn.Layer, policy: str, layer_index: int, *args: Any, every_k: int = 2) -> Any:
    """Run `block(*args)`, recomputing its activations in backward as `policy` says."""
    from paddle.distributed.fleet.utils import recompute

    if policy == "attention_core":
        if not (hasattr(block, "attention_residual") and hasattr(block, "mlp_residual")):
            raise TypeError(f"{type(block).__name__} has no attention_residual / mlp_residual methods, "
                            "which the attention_core recompute policy needs")
        if not block.training or not _active():
            return block(*args)
        x = recompute(block.attention_residual, *args, use_reentrant=False)
        return block.mlp_residual(x)
    if should_recompute(policy, layer_index, every_k) and block.training and _active():
        return recompute(block, *args, use_reentrant=False)
    return block(*args)
