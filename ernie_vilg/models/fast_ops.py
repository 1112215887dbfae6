"""Bias additions whose gradient Paddle's CPU kernels compute slowly, written with a fast backward.

On CPU, Paddle reduces the gradient of a broadcast `x [..., d] + b [d]` over the leading axes with
a generic reduction: for the model's FFN activations ([4096, 512]) that takes as long as the
matmul before it (13.6 ms vs 0.35 ms for the same sum written as `ones [1, N] @ g [N, d]`, measured
with 1 thread; docs/benchmarks.md, "Training step profile"). `add_bias` has the same forward and
the same maths in backward, with the sum done by a GEMV. Only used on CPU while gradients are
recorded; elsewhere (GPU, no_grad, static export) it is the plain broadcast add.

`Linear` is `nn.Linear` (same parameters, same names, so checkpoints do not change) whose bias
goes through `add_bias`.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

Tensor = paddle.Tensor


class _AddBias(PyLayer):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor) -> Tensor:
        return x + bias

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows = grad.reshape([-1, grad.shape[-1]])  # [N, d]
        ones = paddle.ones([1, rows.shape[0]], dtype=rows.dtype)
        return grad, paddle.matmul(ones, rows).reshape([-1])  # d bias = sum over the N rows


# False = always the plain broadcast add (the equality tests compare the two)
FAST_BIAS_GRAD = True


def add_bias(x: Tensor, bias: Tensor) -> Tensor:
    """x [..., d] + bias [d], with the bias gradient summed by a matmul on CPU."""
    if (not FAST_BIAS_GRAD or bias.stop_gradient or not paddle.in_dynamic_mode() or not paddle.is_grad_enabled()
            or not x.place.is_cpu_place()):
        return x + bias
    return _AddBias.apply(x, bias)


class Linear(nn.Linear):
    """nn.Linear with the CPU-fast bias gradient (`add_bias`)."""

    def forward(self, x: Tensor) -> Tensor:
        y = paddle.matmul(x, self.weight)
        return y if self.bias is None else add_bias(y, self.bias)
