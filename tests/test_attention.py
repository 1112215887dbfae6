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


# ------------------------------------------------------------------------------ VQA text prefix
def run_prefixed(layer: SelfAttention, x: np.ndarray, layout: StreamLayout, grad_out: np.ndarray,
                 prefix: np.ndarray | None):
    xt = paddle.to_tensor(x, stop_gradient=False)
    out = layer(xt, layout, None, prefix)
    (out * paddle.to_tensor(grad_out)).sum().backward()
    grads = [xt.grad.numpy()] + [p.grad.numpy() for p in layer.parameters()]
    layer.clear_gradients()
    return out.numpy(), grads


@pytest.mark.parametrize("image_sees_prefix", [False, True])
@pytest.mark.parametrize("kind", [LayerKind.ROW, LayerKind.COLUMN, LayerKind.CONV])
@pytest.mark.parametrize("text_len,h,w,kernel", [c for c in CASES if c[0] >= 4])
def test_blockwise_equals_reference_with_a_per_sample_text_prefix(kind, text_len, h, w, kernel,
                                                                   image_sees_prefix) -> None:
    """Image-to-text with a question prefix (VQA): per-sample prefixes 0 .. L, whole stream and the
    image + common-prefix segment that decoding prefills, with and without image rows seeing the
    question; outputs and gradients < 1e-5."""
    layout = StreamLayout(Direction.IMG2TXT, text_len, h, w, kernel, image_sees_prefix)
    ref, blk = make_pair(kind, kernel)
    rng = np.random.default_rng(7 * text_len + h)
    n = layout.num_image
    prefixes = np.array([0, 1, 2, text_len - 1, text_len], dtype=np.int64)
    cases = [(layout.total, prefixes), (n + 3, np.full(2, 3, dtype=np.int64))]
    for T, prefix in cases:
        x = rng.standard_normal((len(prefix), T, D)).astype("float32")
        g = rng.standard_normal((len(prefix), T, D)).astype("float32")
        out_ref, grads_ref = run_prefixed(ref, x, layout, g, prefix)
        out_blk, grads_blk = run_prefixed(blk, x, layout, g, prefix)
        np.testing.assert_allclose(out_blk, out_ref, atol=1e-5, rtol=0)
        for a, b in zip(grads_blk, grads_ref):
            # parameter gradients sum ~200 rows (values up to ~10): allow float32 summation order
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "sparse_reference", "sparse_blockwise"])
def test_prefix_zero_is_captioning(impl) -> None:
    """Prefix 0 (and 1: only [CLS]) gives exactly the captioning output, in all three cores."""
    layout = StreamLayout(Direction.IMG2TXT, 5, 3, 3, 3)
    paddle.seed(1)
    layer = SelfAttention(D, HEADS, LayerKind.CONV if impl != "dense" else LayerKind.DENSE, impl, 3, -1e4,
                          0.0, 0.2, 0.2)
    x = paddle.randn([2, layout.total, D])
    plain = layer(x, layout).numpy()
    for p in (0, 1):
        np.testing.assert_allclose(layer(x, layout, None, np.full(2, p)).numpy(), plain, atol=1e-6, rtol=0)
    opened = layer(x, layout, None, np.full(2, 4)).numpy()
    n = layout.num_image
    np.testing.assert_allclose(opened[:, :n], plain[:, :n], atol=1e-6)  # image rows never see text
    assert np.abs(opened[:, n:n + 3] - plain[:, n:n + 3]).max() > 1e-4  # question rows now see ahead
    np.testing.assert_allclose(opened[:, n + 4:], plain[:, n + 4:], atol=1e-6)  # answer row after prefix


def test_prefix_is_rejected_in_text_to_image() -> None:
    layout = StreamLayout(Direction.TXT2IMG, 3, 2, 2, 3)
    _, blk = make_pair(LayerKind.ROW, 3)
    with pytest.raises(ValueError, match="image-to-text"):
        blk(paddle.zeros([1, layout.total, D]), layout, None, np.array([2]))
