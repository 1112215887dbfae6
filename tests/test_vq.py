"""The VQVAE image tokenizer: quantizer maths (Eq. 1), EMA / dead-code updates, the tokenizer
interface, config checks, checkpoint round trip and the vq TrainModule."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest

from ernie_vilg.config import ConfigError, VQConfig, load_config
from ernie_vilg.vq import quantizer as quantizer_mod
from ernie_vilg.vq.registry import build_tokenizer, load_tokenizer
from ernie_vilg.vq.base import ImageTokenizer
from ernie_vilg.vq.losses import VQVAELoss
from ernie_vilg.vq.quantizer import VectorQuantizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "vq" / "tiny_vqvae.yaml"


def _quantizer(codes: list[list[float]], **kw) -> VectorQuantizer:
    q = VectorQuantizer(codebook_size=len(codes), embed_dim=len(codes[0]), beta=kw.pop("beta", 0.25), **kw)
    q.codebook.set_value(paddle.to_tensor(codes, dtype="float32"))
    return q


def _as_map(vectors: list[list[float]]) -> paddle.Tensor:
    """[N, d] vectors -> [1, d, 1, N] feature map (one row of N positions)."""
    return paddle.to_tensor(vectors, dtype="float32").T.reshape([1, len(vectors[0]), 1, len(vectors)])


def _tiny_vq(**changes) -> VQConfig:
    vq = load_config(TINY).VQ
    for key, value in changes.items():
        setattr(vq, key, value)
    return vq


# ------------------------------------------------------------------------------ quantizer
def test_straight_through_gradient_reaches_encoder_output_unchanged():
    paddle.seed(0)
    q = VectorQuantizer(codebook_size=16, embed_dim=4, beta=0.25)
    z = paddle.randn([2, 4, 3, 3])
    z.stop_gradient = False
    weight = paddle.randn([2, 4, 3, 3])
    out = q(z)
    (out.z_q * weight).sum().backward()  # a loss on z_q only (no quantizer loss)
    np.testing.assert_allclose(z.grad.numpy(), weight.numpy(), rtol=1e-6)
    # and the forward value is the codebook entry, not z
    np.testing.assert_allclose(out.z_q.numpy(), q.embed_ids(out.ids).numpy(), atol=1e-6)


def test_codebook_and_commitment_terms_on_a_hand_made_example():
    q = _quantizer([[0.0, 0.0], [1.0, 1.0]], beta=0.5)
    z = _as_map([[0.2, 0.0], [1.0, 0.6]])  # nearest codes: 0 and 1
    z.stop_gradient = False
    out = q(z)
    assert out.ids.numpy().tolist() == [[[0, 1]]]
    # squared errors 0.04 and 0.16 over 4 elements -> mean 0.05, for both terms
    sq_mean = (0.2**2 + 0.4**2) / 4
    np.testing.assert_allclose(float(out.loss), sq_mean * (1 + 0.5), rtol=1e-5)
    out.loss.backward()
    # commitment term only reaches E(x): d/dz beta * mean((z - e)^2) = beta * 2 (z - e) / 4
    expected_z = 0.5 * 2 * np.array([[0.2, 0.0], [0.0, -0.4]]) / 4
    np.testing.assert_allclose(z.grad.numpy()[0, :, 0, :].T, expected_z, rtol=1e-5, atol=1e-7)
    # codebook term only reaches the codes: d/de mean((e - z)^2) = 2 (e - z) / 4
    expected_codes = 2 * np.array([[-0.2, 0.0], [0.0, 0.4]]) / 4
    np.testing.assert_allclose(q.codebook.grad.numpy(), expected_codes, rtol=1e-5, atol=1e-7)


def test_ema_update_moves_codes_toward_assigned_vectors_and_drops_codebook_term():
    q = _quantizer([[0.0, 0.0], [5.0, 5.0]], beta=1.0, use_ema=True, ema_decay=0.5)
    assert not any(p.name == q.codebook.name for p in q.parameters())  # the optimizer never sees it
    z = _as_map([[1.0, 1.0], [1.0, 1.0], [4.0, 4.0]])
    q.train()
    out = q(z)
    # the EMA codebook has no codebook loss term: loss = beta * commitment
    np.testing.assert_allclose(float(out.loss), (2 * 2 * 1.0 + 2 * 1.0) / 6, rtol=1e-5)
    codes = q.codebook.numpy()
    assert 0.0 < codes[0, 0] < 1.0 and 4.0 < codes[1, 0] < 5.0
    before = codes.copy()
    for _ in range(20):
        q(z)
    after = q.codebook.numpy()
    assert abs(after[0, 0] - 1.0) < abs(before[0, 0] - 1.0) and abs(after[1, 0] - 4.0) < abs(before[1, 0] - 4.0)
    np.testing.assert_allclose(after[0], [1.0, 1.0], atol=1e-3)


def test_dead_codes_restart_from_current_encoder_outputs_after_the_configured_steps():
    q = _quantizer([[0.0, 0.0], [100.0, 100.0], [-100.0, 50.0]], dead_code_steps=3)
    z = _as_map([[0.1, 0.0], [0.2, 0.1], [0.0, 0.3]])
    q.eval()
    for _ in range(5):
        q(z)  # no restarts outside training
    assert q.codebook.numpy()[1].tolist() == [100.0, 100.0]
    q.train()
    for step in range(3):
        assert q.codebook.numpy()[1].tolist() == [100.0, 100.0], step
        q(z)
    codes = q.codebook.numpy()
    inputs = z.numpy()[0, :, 0, :].T
    for dead in (1, 2):
        assert any(np.allclose(codes[dead], v) for v in inputs), codes[dead]
    assert q.steps_since_used.numpy()[1] == 0
    assert q.usage_stats()["codes_alive"] == 1.0


def test_chunked_lookup_matches_one_block(monkeypatch):
    paddle.seed(1)
    q = VectorQuantizer(codebook_size=64, embed_dim=8, beta=0.25)
    z = paddle.randn([3, 8, 5, 5])
    whole = q.lookup_ids(z).numpy()
    monkeypatch.setattr(quantizer_mod, "_MAX_DISTANCE_ELEMENTS", 64 * 7)  # 7 rows per block
    np.testing.assert_array_equal(q.lookup_ids(z).numpy(), whole)


def test_l2_normalized_lookup_uses_cosine_similarity():
    # Euclidean nearest of (10, 1) is (1, 0)... but so is the cosine one; use a long vector
    q = _quantizer([[1.0, 0.0], [0.0, 1.0]], l2_normalize=True)
    z = _as_map([[0.1, 3.0], [5.0, 0.2]])
    assert q.lookup_ids(z).numpy().tolist() == [[[1, 0]]]
    emb = q.embed_ids(paddle.to_tensor([[[0, 1]]]))
    np.testing.assert_allclose(np.linalg.norm(emb.numpy()[0, :, 0, :], axis=0), [1.0, 1.0], rtol=1e-6)


def test_batch_usage_info():
    q = _quantizer([[0.0], [1.0], [2.0], [3.0]])
    out = q(_as_map([[0.0], [0.1], [1.9], [2.1]]))  # codes 0, 0, 2, 2
    assert float(out.info.codes_used) == pytest.approx(0.5)
    assert float(out.info.perplexity) == pytest.approx(2.0, rel=1e-4)


# ------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize(
    "f, mult, patch", [(4, [1, 2, 2], 1), (8, [1, 1, 2, 2], 1), (16, [1, 1, 1, 2, 2], 1), (8, [1, 2], 4)]
)
def test_encode_decode_shapes_and_id_range(f, mult, patch):
    paddle.seed(0)
    tok = build_tokenizer(_tiny_vq(downsample_factor=f, channel_mult=mult, patch_size=patch))
    assert isinstance(tok, ImageTokenizer)
    images = paddle.uniform([2, 3, 32, 32], min=-1.0, max=1.0)
    ids = tok.encode_to_ids(images)
    g = tok.grid_size(32)
    assert g == 32 // f and ids.shape == [2, g, g] and ids.dtype == paddle.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.codebook_size
    assert tok.embed_ids(ids).shape == [2, tok.cfg.embed_dim, g, g]
    recon = tok.decode_ids(ids)
    assert recon.shape == [2, 3, 32, 32] and recon.dtype == paddle.float32
    assert float(recon.min()) >= -1.0 and float(recon.max()) <= 1.0
    out = tok(images)
    assert out.recon.shape == [2, 3, 32, 32] and out.ids.shape == [2, g, g]
    assert tok.get_last_layer() is tok.decoder.conv_out.weight


def test_channel_mult_that_does_not_match_downsample_factor_raises():
    with pytest.raises(ConfigError, match="channel_mult"):
        build_tokenizer(_tiny_vq(downsample_factor=8, channel_mult=[1, 2, 2], patch_size=1))
    with pytest.raises(ConfigError, match="downsample_factor"):
        build_tokenizer(_tiny_vq(downsample_factor=6))


def test_unknown_tokenizer_kind_raises_naming_it():
    with pytest.raises(ConfigError, match="'vqgan9'"):
        build_tokenizer(_tiny_vq(kind="vqgan9"))


def test_freeze_stops_gradients_and_runs_fp32_under_autocast():
    tok = build_tokenizer(_tiny_vq()).freeze()
    assert not tok.training and all(p.stop_gradient for p in tok.parameters())
    images = paddle.uniform([1, 3, 64, 64], min=-1.0, max=1.0)
    with paddle.amp.auto_cast(enable=True, level="O1", dtype="bfloat16"):
        ids = tok.encode_to_ids(images)
        recon = tok.decode_ids(ids)
    assert recon.dtype == paddle.float32 and ids.dtype == paddle.int64


def test_load_tokenizer_rebuilds_a_trainer_checkpoint(tmp_path):
    from ernie_vilg.checkpoint_io import save_checkpoint

    cfg = load_config(TINY)
    paddle.seed(3)
    tok = build_tokenizer(cfg.VQ)
    tok.train()
    tok(paddle.uniform([2, 3, 64, 64], min=-1.0, max=1.0))  # move the usage buffers
    ckpt = save_checkpoint(tmp_path, 7, cfg, tok.state_dict())
    loaded = load_tokenizer(ckpt)
    assert not loaded.training and all(p.stop_gradient for p in loaded.parameters())
    images = paddle.uniform([2, 3, 64, 64], min=-1.0, max=1.0)
    tok.eval()
    np.testing.assert_array_equal(loaded.encode_to_ids(images).numpy(), tok.encode_to_ids(images).numpy())


# ------------------------------------------------------------------------------ loss + module
def test_vqvae_loss_is_reconstruction_mse_plus_quantizer_loss():
    tok = build_tokenizer(_tiny_vq())
    images = paddle.uniform([2, 3, 64, 64], min=-1.0, max=1.0)
    out = tok(images)
    loss, logs = VQVAELoss()(images, out)
    mse = float(((out.recon - images) ** 2).mean())
    assert float(loss) == pytest.approx(mse + float(out.quant_loss), rel=1e-5)
    assert set(logs) >= {"rec_loss", "quant_loss", "perplexity", "codes_used"}


def test_vq_train_module_steps_and_validates_on_shapes(tmp_path):
    from ernie_vilg.data.shapes import write_shapes_dataset
    from ernie_vilg.stages.vq import VQTrainModule
    from ernie_vilg.training.module import StepContext

    write_shapes_dataset(tmp_path / "data", 8, 4, 0, size=64, seed=0, progress=False)
    cfg = load_config(TINY, [
        f"Data.train_manifest={tmp_path / 'data' / 'train.jsonl'}",
        f"Data.val_manifest={tmp_path / 'data' / 'val.jsonl'}",
    ])
    module = VQTrainModule(cfg)
    model = module.build_model()
    opt = paddle.optimizer.AdamW(1e-3, parameters=model.parameters())
    batches = iter(module.train_batches(0, 1))
    for step in range(2):
        loss, logs = module.training_step(StepContext(model, model, step), next(batches))
        loss.backward()
        opt.step()
        opt.clear_grad()
    assert np.isfinite(float(loss)) and {"rec_loss", "codes_used", "codes_alive"} <= set(logs)
    model.eval()
    metrics = module.validate(model, 2)
    assert metrics["num_images"] == 4 and metrics["psnr"] > 0
    assert 0 < metrics["codes_used"] <= 1 and "judge_all" in metrics and "judge_colour" in metrics
    module.save_extras(model, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
