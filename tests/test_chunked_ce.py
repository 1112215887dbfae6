"""The chunked linear + cross-entropy (models/chunked_ce.py, Train.loss_chunk_tokens): same loss and
gradients as the plain logits path, for the bare function and for the whole bidirectional model."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ernie_vilg.config import ConfigError, load_config
from ernie_vilg.models.chunked_ce import linear_cross_entropy
from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
from ernie_vilg.models.transformer import ErnieViLG
from test_model import random_batch, tiny_cfg


def _leaf(array: np.ndarray) -> paddle.Tensor:
    t = paddle.to_tensor(array.astype("float32"))
    t.stop_gradient = False
    return t


@pytest.mark.parametrize("chunk", [1, 5, 16, 74, 500])
def test_function_equals_plain_cross_entropy_in_loss_and_all_gradients(chunk: int) -> None:
    rng = np.random.default_rng(0)
    h0, w0, b0 = rng.normal(size=(2, 37, 16)), 0.5 * rng.normal(size=(50, 16)), 0.1 * rng.normal(size=50)
    targets = paddle.to_tensor(rng.integers(0, 50, (2, 37)))
    mask = paddle.to_tensor((rng.random((2, 37)) > 0.3).astype("float32"))
    upstream = paddle.to_tensor(rng.normal(size=(2, 37)).astype("float32"))  # any downstream use of the NLLs

    def run(chunked: bool) -> list[np.ndarray]:
        h, w, b = _leaf(h0), _leaf(w0), _leaf(b0)
        if chunked:
            nll = linear_cross_entropy(h, w, b, targets, chunk)
        else:
            logits = paddle.matmul(h, w, transpose_y=True) + b
            nll = F.cross_entropy(logits, targets.unsqueeze(-1), reduction="none").squeeze(-1)
        loss = (nll * mask).sum() / mask.sum() + (nll * upstream).mean()
        loss.backward()
        return [loss.numpy(), nll.numpy(), h.grad.numpy(), w.grad.numpy(), b.grad.numpy()]

    for got, want, name in zip(run(True), run(False), ("loss", "nll", "dh", "dW", "db")):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)


def test_function_checks_its_inputs() -> None:
    h, w = paddle.zeros([3, 4]), paddle.zeros([6, 4])
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(h, w, None, paddle.zeros([3], "int64"), 0)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w, None, paddle.zeros([2], "int64"), 2)


@pytest.mark.parametrize("impl", ["dense", "sparse_blockwise"])
def test_bidirectional_loss_and_gradients_equal_the_plain_heads(impl: str) -> None:
    """Forward loss and the gradients w.r.t. the tied embeddings, the head biases and every other
    parameter (which includes the path through the hidden states) agree to < 1e-5."""
    text, image = random_batch(3)

    def run(chunk: int) -> tuple[list[float], dict[str, np.ndarray]]:
        paddle.seed(0)
        model = ErnieViLG(tiny_cfg(impl))
        model.train()
        loss = bidirectional_loss(model, VilgCriterion(pad_id=0, txt2img_weight=1.0, chunk_tokens=chunk), text, image)
        loss.total.backward()
        grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
        return [float(loss.total), float(loss.txt2img), float(loss.img2txt)], grads

    plain_losses, plain_grads = run(0)
    for chunk in (7, 1000):
        losses, grads = run(chunk)
        np.testing.assert_allclose(losses, plain_losses, atol=1e-5, rtol=0)
        assert grads.keys() == plain_grads.keys()
        for name in ("tok_emb_img.weight", "tok_emb_txt.weight", "head_img.bias", "head_txt.bias"):
            assert name in grads  # the tied weights and biases take gradients through the chunked head
        for name, g in grads.items():
            np.testing.assert_allclose(g, plain_grads[name], atol=1e-5, rtol=0, err_msg=name)


def test_default_is_off_and_negative_values_are_refused() -> None:
    assert load_config(None).Train.loss_chunk_tokens == 0
    with pytest.raises(ConfigError, match="Train.loss_chunk_tokens"):
        load_config(None, ["Train.loss_chunk_tokens=-1"])
    with pytest.raises(ValueError, match="chunk_tokens"):
        VilgCriterion(pad_id=0, chunk_tokens=-2)


def test_head_targets_need_direction_both() -> None:
    paddle.seed(0)
    model = ErnieViLG(tiny_cfg())
    text, image = random_batch()
    with pytest.raises(ValueError, match="both"):
        model(text, image, "txt2img", head_targets=(image, text[:, 1:]), chunk_tokens=4)
