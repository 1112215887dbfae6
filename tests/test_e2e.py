"""End-to-end text-to-image: the reconstruction loss reaches the transformer; both reconstructors
decode gold and generated sequences."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from ernie_vilg.config import E2EConfig, ModelConfig, VQConfig
from ernie_vilg.generation.decoding import SamplingParams, generate_image_tokens
from ernie_vilg.models.e2e import ErnieViLGE2E
from ernie_vilg.vq.dvae import DVAE
from ernie_vilg.vq.vqgan import VQGAN


def _tiny(kind: str = "dvae"):
    paddle.seed(0)
    vq = VQConfig(kind=kind, hidden_channels=8, channel_mult=[1, 2], num_res_blocks=1, downsample_factor=8,
                  patch_size=4, codebook_size=16, embed_dim=8, dead_code_steps=0)
    tokenizer = (DVAE(vq) if kind == "dvae" else VQGAN(vq)).freeze()
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, attention_impl="dense", conv_kernel=3,
                      text_vocab_size=20, image_vocab_size=16, max_text_len=8, image_grid=4)
    return ErnieViLGE2E(cfg, tokenizer, E2EConfig()), tokenizer


def _batch(b: int = 2):
    rng = np.random.default_rng(0)
    text = paddle.to_tensor(rng.integers(1, 20, (b, 6)).astype(np.int64))
    ids = paddle.to_tensor(rng.integers(0, 16, (b, 4, 4)).astype(np.int64))
    images = paddle.to_tensor(rng.uniform(-1, 1, (b, 3, 32, 32)).astype(np.float32))
    return text, ids, images


@pytest.mark.parametrize("kind", ["dvae", "vqgan"])
def test_reconstruction_loss_changes_the_transformer_weights(kind):
    model, tokenizer = _tiny(kind)
    text, ids, images = _batch()
    _, h_img = model.txt2img_with_hidden(text, ids)
    rec = model.reconstruction_loss(model.e2e(h_img), images)  # the reconstruction term alone
    rec.backward()
    for name in ("blocks.0.attn", "blocks.1.mlp", "tok_emb_img", "e2e.mapping", "e2e.decoder.decoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name) and p.grad is not None]
        assert grads and max(float(g.abs().max()) for g in grads) > 0, name
    before = {n: p.numpy().copy() for n, p in model.named_parameters() if n.startswith("blocks.")}
    paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters()).step()
    changed = [n for n, p in model.named_parameters() if n in before and not np.array_equal(before[n], p.numpy())]
    assert len(changed) == len(before)  # every transformer weight moved, from the reconstruction loss
    # the stage-1 tokenizer the reconstructor was copied from is untouched and frozen
    assert all(p.stop_gradient for p in tokenizer.parameters())


def test_generation_logits_equal_the_plain_forward():
    model, _ = _tiny()
    model.eval()
    text, ids, _ = _batch()
    logits, _ = model.txt2img_with_hidden(text, ids)
    np.testing.assert_allclose(logits.numpy(), model(text, ids, "txt2img").numpy(), rtol=1e-5, atol=1e-5)


def test_both_reconstructors_decode_gold_and_generated_sequences():
    model, tokenizer = _tiny()
    model.eval()
    text, gold, _ = _batch()
    with paddle.no_grad():
        generated = paddle.to_tensor(generate_image_tokens(model, text.numpy(), SamplingParams(greedy=False, top_k=4)))
        for ids in (gold, generated):
            two_stage = tokenizer.decode_ids(ids)
            end_to_end = model.reconstruct_from_ids(text, ids)
            assert list(two_stage.shape) == list(end_to_end.shape) == [2, 3, 32, 32]
            assert float(end_to_end.abs().max()) <= 1.0
    # initialised from the tokenizer: before training the e2e decoder IS the two-stage decoder
    z = tokenizer.embed_ids(gold)
    np.testing.assert_allclose(model.e2e.decoder.decode_embeddings(z).numpy(),
                               tokenizer.decode_embeddings(z).numpy(), rtol=1e-5, atol=1e-5)
