"""Chunked (fused) linear + cross-entropy for the tied output heads.

The plain head computes logits = h W^T + b for every target position, [tokens, V] in float32,
and cross-entropy keeps its softmax; backward then holds the logits' gradient of the same size.
At 2 x 1,024 image tokens and 8,192 codes that is three 64 MiB tensors per direction, the same
for dense and sparse attention (docs/benchmarks.md, "Block-wise sparse vs dense").

`linear_cross_entropy` gives the same per-token negative log-likelihood without ever holding
more than `chunk_tokens` rows of logits:

* forward: per chunk of tokens, logits -> logsumexp and the target's logit; only the
  logsumexp [N] is kept;
* backward: per chunk, the logits are recomputed (one extra head matmul) and turned into
  g * (softmax - onehot) in place, which gives that chunk's rows of dh and its share of dW, db.

The loss is unchanged (the paper's token NLL); only where the arithmetic happens changes.
"""
from __future__ import annotations

import paddle
from paddle.autograd import PyLayer

Tensor = paddle.Tensor


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """float32 logits of one chunk [c, V] (float32 like the plain path's softmax)."""
    logits = paddle.matmul(h, weight, transpose_y=True).astype("float32")
    return logits if bias is None else logits + bias.astype("float32")


class _LinearCrossEntropy(PyLayer):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk: int) -> Tensor:
        n = h.shape[0]
        lse_parts, nll_parts = [], []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = _chunk_logits(h[start:stop], weight, bias)  # [c, V]
            lse = paddle.logsumexp(logits, axis=-1)  # [c]
            picked = paddle.take_along_axis(logits, targets[start:stop].unsqueeze(-1), axis=-1).squeeze(-1)
            lse_parts.append(lse)
            nll_parts.append(lse - picked)
            del logits
        lse_all = paddle.concat(lse_parts) if len(lse_parts) > 1 else lse_parts[0]
        ctx.save_for_backward(h, weight, bias, targets, lse_all)
        ctx.chunk = chunk
        return paddle.concat(nll_parts) if len(nll_parts) > 1 else nll_parts[0]

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        h, weight, bias, targets, lse = ctx.saved_tensor()
        chunk, n = ctx.chunk, h.shape[0]
        grad_nll = grad_nll.astype("float32")
        need_h, need_w = not h.stop_gradient, not weight.stop_gradient
        need_b = bias is not None and not bias.stop_gradient
        grad_w = paddle.zeros(weight.shape, dtype="float32") if need_w else None
        grad_b = paddle.zeros(bias.shape, dtype="float32") if need_b else None
        grad_h_parts = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            hc, g = h[start:stop], grad_nll[start:stop].unsqueeze(-1)  # [c, d], [c, 1]
            # d nll / d logits = softmax - onehot(target), scaled by the incoming gradient
            # (in place: one [c, V] buffer per chunk)
            dlogits = _chunk_logits(hc, weight, bias).subtract_(lse[start:stop].unsqueeze(-1)).exp_()
            dlogits.put_along_axis_(targets[start:stop].unsqueeze(-1),
                                    paddle.full([stop - start, 1], -1.0, "float32"), axis=-1, reduce="add")
            dlogits.multiply_(g)
            if need_h:
                grad_h_parts.append(paddle.matmul(dlogits.astype(weight.dtype), weight).astype(h.dtype))
            if need_w:
                grad_w.add_(paddle.matmul(dlogits, hc.astype("float32"), transpose_x=True))
            if need_b:
                grad_b.add_(dlogits.sum(axis=0))
            del dlogits
        grad_h = None
        if need_h:
            grad_h = paddle.concat(grad_h_parts) if len(grad_h_parts) > 1 else grad_h_parts[0]
        grad_w = grad_w.astype(weight.dtype) if need_w else None
        grad_b = grad_b.astype(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         chunk_tokens: int) -> Tensor:
    """Per-token NLL of softmax(h W^T + b) at `targets`, computed `chunk_tokens` rows at a time.

    h [..., d], weight [V, d] (a tied embedding), bias [V] or None, targets [...] int64 ->
    nll [...] float32, equal to `F.cross_entropy(h W^T + b, targets, reduction="none")`.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if list(h.shape[:-1]) != list(targets.shape):
        raise ValueError(f"hidden states {list(h.shape)} and targets {list(targets.shape)} do not match")
    lead = list(targets.shape)
    flat_h = h.reshape([-1, h.shape[-1]])
    flat_t = targets.reshape([-1]).astype("int64")
    if bias is None:  # PyLayer inputs must be tensors: a zero bias that takes no gradient
        bias = paddle.zeros([weight.shape[0]], dtype=weight.dtype)
    nll = _LinearCrossEntropy.apply(flat_h, weight, bias, flat_t, int(chunk_tokens))
    return nll.reshape(lead)
