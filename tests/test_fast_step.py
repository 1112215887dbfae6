"""The fast training step computes what the plain one did: one pass for both directions, the
CPU-fast bias gradients and Paddle's contiguous (non-stride) kernels change no loss or gradient."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from ernie_vilg import runtime
from ernie_vilg.models import fast_ops
from ernie_vilg.models.guidance import NULL_IMAGE_ID
from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
from ernie_vilg.models.sparse_masks import Direction, PairedLayout, StreamLayout
from test_model import IMPLS, build, random_batch


def _plain_step(model, text, image, t2i_text=None, i2t_image=None):
    """The step as it was written before: one forward per direction, plain bias adds, stride kernels."""
    old_fast, old_stride = fast_ops.FAST_BIAS_GRAD, paddle.get_flags(["FLAGS_use_stride_kernel"])
    fast_ops.FAST_BIAS_GRAD = False
    paddle.set_flags({"FLAGS_use_stride_kernel": True})
    try:
        crit = VilgCriterion(pad_id=0)
        loss = crit(model(text if t2i_text is None else t2i_text, image, Direction.TXT2IMG), image,
                    model(text, image if i2t_image is None else i2t_image, Direction.IMG2TXT), text)
        loss.total.backward()
    finally:
        fast_ops.FAST_BIAS_GRAD = old_fast
        paddle.set_flags(old_stride)
    return loss


def _grads(model) -> dict[str, np.ndarray]:
    out = {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return out


def _compare(model, text, image, t2i_text=None, i2t_image=None) -> None:
    ref = _plain_step(model, text, image, t2i_text, i2t_image)
    ref_grads = _grads(model)
    new = bidirectional_loss(model, VilgCriterion(pad_id=0), text, image, t2i_text, i2t_image)
    new.total.backward()
    new_grads = _grads(model)
    for a, b in ((ref.txt2img, new.txt2img), (ref.img2txt, new.img2txt), (ref.total, new.total)):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == new_grads.keys() and len(ref_grads) > 10
    for name in ref_grads:
        np.testing.assert_allclose(new_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_pass_step_equals_the_per_direction_step(impl: str) -> None:
    model = build(impl)
    model.train()
    _compare(model, *random_batch(1))


def test_one_pass_step_equals_per_direction_with_guidance_inputs() -> None:
    model = build("sparse_blockwise")
    model.train()
    text, image = random_batch(2)
    t2i_text = text.numpy().copy()
    t2i_text[1] = [2, 3, 0, 0, 0]  # row 1: the null text [CLS] [SEP] [PAD]..
    i2t_image = image.numpy().copy()
    i2t_image[0] = NULL_IMAGE_ID  # row 0: the null image
    _compare(model, text, image, paddle.to_tensor(t2i_text), paddle.to_tensor(i2t_image))


def test_one_pass_step_with_recompute_gives_the_same_gradients() -> None:
    text, image = random_batch(3)
    grads = []
    for policy in ("none", "full"):
        paddle.seed(0)
        from test_model import tiny_cfg
        from ernie_vilg.models.transformer import ErnieViLG

        model = ErnieViLG(tiny_cfg(), recompute=policy)
        model.train()
        bidirectional_loss(model, VilgCriterion(pad_id=0), text, image).total.backward()
        grads.append(_grads(model))
    for name in grads[0]:
        np.testing.assert_allclose(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_both_direction_logits_match_forward_of_each_direction() -> None:
    model = build("sparse_reference")
    text, image = random_batch(4)
    img_logits, txt_logits = model(text, image, "both")
    np.testing.assert_allclose(img_logits.numpy(), model(text, image, Direction.TXT2IMG).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(txt_logits.numpy(), model(text, image, Direction.IMG2TXT).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="text prefix"):
        model(text, image, "both", np.array([2, 2]))
    with pytest.raises(ValueError, match="direction 'both'"):
        model(text, image, Direction.TXT2IMG, None, text)


def test_paired_layout_needs_one_stream_of_each_direction() -> None:
    t2i, i2t = StreamLayout(Direction.TXT2IMG, 5, 4, 4, 3), StreamLayout(Direction.IMG2TXT, 5, 4, 4, 3)
    assert PairedLayout(t2i, i2t).total == 21
    with pytest.raises(ValueError, match="paired layout"):
        PairedLayout(i2t, t2i)
    with pytest.raises(ValueError, match="paired layout"):
        PairedLayout(t2i, StreamLayout(Direction.IMG2TXT, 6, 4, 4, 3))


@pytest.mark.parametrize("shape", [[7, 12], [3, 5, 12]])
def test_add_bias_gradient_equals_the_broadcast_add(shape: list[int]) -> None:
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal(shape).astype("float32"), stop_gradient=False)
    b = paddle.to_tensor(rng.standard_normal(shape[-1]).astype("float32"), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
    (fast_ops.add_bias(x, b) * w).sum().backward()
    fast = (x.grad.numpy().copy(), b.grad.numpy().copy())
    x.clear_gradient(), b.clear_gradient()
    ((x + b) * w).sum().backward()
    np.testing.assert_allclose(fast[0], x.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(fast[1], b.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast[1], w.numpy().reshape(-1, shape[-1]).sum(0), rtol=1e-5, atol=1e-6)


def test_fast_linear_keeps_nn_linear_parameter_names() -> None:
    layer = fast_ops.Linear(4, 3)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    x = paddle.ones([2, 4])
    np.testing.assert_allclose(layer(x).numpy(), (x @ layer.weight + layer.bias).numpy(), rtol=1e-6)


def test_contiguous_views_flag_is_set_for_cpu_builds_only_and_never_overrides_the_user() -> None:
    env: dict[str, str] = {}
    assert runtime.contiguous_views_on_cpu(env, cpu_build=True) and env[runtime.STRIDE_KERNEL_VAR] == "0"
    env = {}
    assert not runtime.contiguous_views_on_cpu(env, cpu_build=False) and not env
    env = {runtime.STRIDE_KERNEL_VAR: "1"}
    assert not runtime.contiguous_views_on_cpu(env, cpu_build=True) and env[runtime.STRIDE_KERNEL_VAR] == "1"


def test_keep_freed_memory_leaves_a_users_malloc_settings_alone(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert runtime.keep_freed_memory() is False


@pytest.mark.parametrize("max_keys", [0, 10_000])  # 0: every step gathers its visible keys; else masked scores
@pytest.mark.parametrize("direction", list(Direction))
def test_both_decoding_step_cores_equal_the_uncached_reference(monkeypatch, max_keys: int, direction) -> None:
    from ernie_vilg.generation.decoding import CachedStepper, FullStepper
    from ernie_vilg.models import attention

    monkeypatch.setattr(attention, "MASKED_STEP_MAX_KEYS", max_keys)
    model = build("sparse_blockwise")
    text, image = (t.numpy() for t in random_batch(5))
    source = text if direction is Direction.TXT2IMG else image.reshape(image.shape[0], -1)
    targets = image.reshape(image.shape[0], -1) if direction is Direction.TXT2IMG else text
    cached, full = CachedStepper(model, direction, text_len=text.shape[1]), FullStepper(model, direction, text_len=text.shape[1])
    first = cached.start(source), full.start(source)
    if direction is Direction.TXT2IMG:  # image-to-text: [CLS] is given, its prediction unused
        np.testing.assert_allclose(*first, atol=1e-4)
    for j in range(targets.shape[1] - 1):
        np.testing.assert_allclose(cached.step(targets[:, j]), full.step(targets[:, j]), atol=1e-4, err_msg=str(j))
