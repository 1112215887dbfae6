"""Block-wise sparse attention equals the dense-mask reference (outputs and gradients, fp32)."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from ernie_vilg.models.attention import SelfAttention
from ernie_vilg.models.sparse_masks import Direction, LayerKind, StreamLayout

D, HEADS = 16, 2


def make_pair(kind: LayerKind, kernel: int) -> tuple[SelfAttention, SelfAttention]:
    paddle.seed(0)
    ref = SelfAttention(D, HEADS, kind, "sparse_reference", kernel, -1e4, 0.0, 0.2, 0.2)
    blk = SelfAttention(D, HEADS, kind, "sparse_blockwise", kernel, -1e4, 0.0, 0.2, 0.2)
    blk.set_state_dict(ref.state_dict())
    return ref, blk


def run(layer: SelfAttention, x: np.ndarray, layout: StreamLayout, grad_out: np.ndarray):
    xt = paddle.to_tensor(x, stop_gradient=False)
    out = layer(xt, layout)
    (out * paddle.to_tensor(grad_out)).sum().backward()
    grads = [xt.grad.numpy()] + [p.grad.numpy() for p in layer.parameters()]
    layer.clear_gradients()
    return out.numpy(), grads


CASES = [  # (text length, grid h, grid w, conv kernel)
    (6, 4, 4, 3),
    (1, 3, 5, 3),
    (4, 5, 3, 5),
    (7, 6, 6, 5),
]


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("kind", [LayerKind.ROW, LayerKind.COLUMN, LayerKind.CONV])
@pytest.mark.parametrize("text_len,h,w,kernel", CASES)
def test_blockwise_equals_reference(direction, kind, text_len, h, w, kernel) -> None:
    layout = StreamLayout(direction, text_len, h, w, kernel)
    ref, blk = make_pair(kind, kernel)
    rng = np.random.default_rng(text_len * 100 + h * 10 + w)
    for T in (layout.total, layout.source_len):  # whole stream and source-only prefix
        x = rng.standard_normal((2, T, D)).astype("float32")
        g = rng.standard_normal((2, T, D)).astype("float32")
        out_ref, grads_ref = run(ref, x, layout, g)
        out_blk, grads_blk = run(blk, x, layout, g)
        np.testing.assert_allclose(out_blk, out_ref, atol=1e-5, rtol=0)
        for a, b in zip(grads_blk, grads_ref):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_blockwise_rejects_other_prefix_lengths() -> None:
    layout = StreamLayout(Direction.TXT2IMG, 3, 2, 2, 3)
    _, blk = make_pair(LayerKind.ROW, 3)
    with pytest.raises(ValueError, match="source"):
        blk(paddle.zeros([1, 4, D]), layout)


@pytest.mark.parametrize("direction", list(Direction))
def test_sparse_attention_ignores_keys_outside_the_pattern(direction) -> None:
    """Perturbing an image token outside a query's row leaves that query unchanged (row layer)."""
    layout = StreamLayout(direction, 2, 3, 3, 3)
    _, blk = make_pair(LayerKind.ROW, 3)
    x = paddle.randn([1, layout.total, D])
    out1 = blk(x, layout).numpy()
    x2 = x.clone()
    victim = layout.image_start + 8  # row 2, column 2
    x2[:, victim] = x2[:, victim] + 5.0
    out2 = blk(x2, layout).numpy()
    rows_0_1 = slice(layout.image_start, layout.image_start + 6)
    np.testing.assert_allclose(out1[:, rows_0_1], out2[:, rows_0_1], atol=1e-6)
