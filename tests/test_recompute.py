"""Recompute policies give the same loss and gradients as no recompute (on a small block stack)."""
import numpy as np
import paddle
import pytest

from ernie_vilg.models.recompute import POLICIES, recompute_block, should_recompute


class TinyBlock(paddle.nn.Layer):
    """Pre-LN block shaped like the transformer's, with dropout so that RNG replay matters."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln1, self.ln2 = paddle.nn.LayerNorm(d), paddle.nn.LayerNorm(d)
        self.qkv, self.proj = paddle.nn.Linear(d, 3 * d), paddle.nn.Linear(d, d)
        self.fc1, self.fc2 = paddle.nn.Linear(d, 4 * d), paddle.nn.Linear(4 * d, d)
        self.drop = paddle.nn.Dropout(0.1)

    def _attn(self, x, scale):
        q, k, v = paddle.split(self.qkv(x), 3, axis=-1)
        probs = paddle.nn.functional.softmax(paddle.matmul(q, k, transpose_y=True) * scale, axis=-1)
        return self.drop(self.proj(paddle.matmul(self.drop(probs), v)))

    def attention_residual(self, x, scale):
        return x + self._attn(self.ln1(x), scale)

    def mlp_residual(self, x):
        return x + self.drop(self.fc2(paddle.nn.functional.gelu(self.fc1(self.ln2(x)))))

    def forward(self, x, scale):
        return self.mlp_residual(self.attention_residual(x, scale))


def run(policy: str, input_requires_grad: bool):
    paddle.seed(3)
    blocks = paddle.nn.LayerList([TinyBlock() for _ in range(4)])
    emb = paddle.nn.Embedding(10, 16)
    ids = paddle.to_tensor(np.arange(12).reshape(2, 6) % 10)
    paddle.seed(7)  # same dropout masks in every run
    x = emb(ids)
    if not input_requires_grad:
        x = x.detach()  # the pitfall case: reentrant recompute would drop parameter grads here
    for i, block in enumerate(blocks):
        x = recompute_block(block, policy, i, x, 0.25, every_k=2)
    loss = (x ** 2).mean()
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in blocks.named_parameters()}
    return float(loss), grads


@pytest.mark.parametrize("input_requires_grad", [True, False])
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_recompute_matches_no_recompute(policy, input_requires_grad):
    ref_loss, ref_grads = run("none", input_requires_grad)
    loss, grads = run(policy, input_requires_grad)
    assert loss == ref_loss
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        # recomputation replays the same kernels: identical up to float32 rounding
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, err_msg=name)
        assert np.abs(grads[name]).sum() > 0, name


def test_policy_selection():
    assert [should_recompute("every_k", i, 3) for i in range(6)] == [True, False, False, True, False, False]
    assert all(should_recompute("full", i) for i in range(4))
    assert not any(should_recompute("none", i) for i in range(4))
    with pytest.raises(ValueError, match="unknown recompute policy"):
        should_recompute("selective", 0)


def test_attention_core_needs_split_block():
    block = paddle.nn.Linear(4, 4)
    with pytest.raises(TypeError, match="attention_residual"):
        recompute_block(block, "attention_core", 0, paddle.ones([2, 4]))


def test_eval_mode_and_no_grad_skip_recompute():
    block = TinyBlock()
    block.eval()
    x = paddle.ones([1, 3, 16])
    x.stop_gradient = False
    out = recompute_block(block, "full", 0, x, 0.25)
    np.testing.assert_allclose(out.numpy(), block(x, 0.25).numpy())


def test_policies_on_the_real_transformer_block():
    """The block of models/transformer.py, split the way the attention_core policy needs
    (the two methods below are what the model's Block should define)."""
    from ernie_vilg.config import ModelConfig
    from ernie_vilg.models.sparse_masks import Direction
    from ernie_vilg.models.transformer import Block, layer_kinds, stream_layout

    class SplitBlock(Block):
        def attention_residual(self, x, layout, cache=None):
            return x + self.attn(self.ln1(x), layout, cache)

        def mlp_residual(self, x):
            return x + self.mlp(self.ln2(x))

    cfg = ModelConfig(num_layers=4, hidden_size=16, num_heads=2, dropout=0.1, conv_kernel=3, text_vocab_size=20,
                      image_vocab_size=16, max_text_len=4, image_grid=3)
    layout = stream_layout(cfg, Direction.TXT2IMG)

    def run(policy):
        paddle.seed(5)
        blocks = paddle.nn.LayerList([SplitBlock(cfg, kind) for kind in layer_kinds(4, cfg.attention_impl)])
        x = paddle.randn([2, layout.total, 16])
        x.stop_gradient = False
        paddle.seed(9)
        h = x
        for i, block in enumerate(blocks):
            h = recompute_block(block, policy, i, h, layout, None, every_k=2)
        loss = (h ** 2).mean()
        loss.backward()
        return float(loss), [p.grad.numpy() for p in blocks.parameters()], x.grad.numpy()

    ref_loss, ref_grads, ref_dx = run("none")
    for policy in ("full", "every_k", "attention_core"):
        loss, grads, dx = run(policy)
        assert loss == pytest.approx(ref_loss, rel=1e-6), policy
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-7)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
