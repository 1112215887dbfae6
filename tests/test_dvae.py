"""dVAE (DALL-E): relaxation, schedules, logit-Laplace loss, argmax ids, the dvae stage."""
from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from ernie_vilg.config import Config, ConfigError, DVAEConfig, VQConfig
from ernie_vilg.vq.registry import load_tokenizer
from ernie_vilg.training.trainer import Trainer
from ernie_vilg.vq.dvae import DVAE, DVAEOutput, cosine_schedule, kl_to_uniform, map_pixels, relaxed_one_hot
from ernie_vilg.stages.dvae import DVAETrainModule
from ernie_vilg.vq.dvae_train import DVAELoss, apply_code_splits, logit_laplace_nll, plan_code_splits
from shapes32_fixture import shapes_dir  # noqa: F401  (fixture)

TINY = dict(kind="dvae", hidden_channels=8, channel_mult=[1, 2], num_res_blocks=1, downsample_factor=8,
            patch_size=4, codebook_size=16, embed_dim=8)


def test_schedules_anneal_temperature_and_ramp_kl():
    assert cosine_schedule(0, 1.0, 1 / 16, 100) == 1.0
    assert cosine_schedule(100, 1.0, 1 / 16, 100) == 1 / 16 == cosine_schedule(500, 1.0, 1 / 16, 100)
    assert abs(cosine_schedule(50, 0.0, 6.6, 100) - 3.3) < 1e-9


def test_relaxation_and_kl():
    logits = paddle.randn([2, 16, 3, 3])
    soft = relaxed_one_hot(logits, 0.5)
    np.testing.assert_allclose(soft.sum(axis=1).numpy(), 1.0, rtol=1e-5)
    hard = relaxed_one_hot(logits, 0.5, hard=True)
    assert set(np.unique(hard.numpy().round(6))) <= {0.0, 1.0}
    assert abs(float(kl_to_uniform(paddle.zeros([1, 16, 2, 2])))) < 1e-6  # uniform q
    peaked = paddle.zeros([1, 16, 1, 1]); peaked[0, 3] = 100.0
    assert abs(float(kl_to_uniform(peaked)) - math.log(16)) < 1e-3


def test_kl_matches_log_softmax_in_value_and_gradient():
    # kl_to_uniform avoids F.log_softmax(axis=1) (slow on CPU); it must still be the same function
    logits = paddle.randn([2, 16, 3, 3]) * 4.0
    a, b = logits.clone(), logits.clone()
    a.stop_gradient = b.stop_gradient = False
    kl = kl_to_uniform(a)
    log_q = paddle.nn.functional.log_softmax(b, axis=1)
    ref = (log_q.exp() * (log_q + math.log(16))).sum(axis=1).mean()
    np.testing.assert_allclose(float(kl), float(ref), rtol=1e-5)
    kl.backward()
    ref.backward()
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_logit_laplace_nll_is_lowest_at_the_right_mean():
    x = paddle.uniform([1, 3, 4, 4], min=-1, max=1)
    x01 = (x + 1) / 2 * 0.8 + 0.1
    mu = paddle.log(x01) - paddle.log(1 - x01)
    good = logit_laplace_nll(x, paddle.concat([mu, paddle.zeros_like(mu)], axis=1), 0.1)
    bad = logit_laplace_nll(x, paddle.concat([mu + 1, paddle.zeros_like(mu)], axis=1), 0.1)
    assert float(good) < float(bad)


def test_mse_recon_loss_has_gradient_where_the_decoded_image_is_clipped():
    # a white target pixel decoded far darker than black (sigmoid(mu) < eps, clipped to 0 in the
    # image) must still be pulled up: the mse option is taken before unmap_pixels' clip
    images = paddle.ones([1, 3, 4, 4])
    stats = paddle.concat([paddle.full([1, 3, 4, 4], -6.0), paddle.zeros([1, 3, 4, 4])], axis=1)
    stats.stop_gradient = False
    recon = DVAE.stats_to_image(stats)
    assert float(recon.max()) == -1.0  # clipped to black
    out = DVAEOutput(logits=paddle.zeros([1, 16, 1, 1]), stats=stats, recon=recon, ids=paddle.zeros([1, 1, 1], "int64"))
    loss, _ = DVAELoss(DVAEConfig(recon_loss="mse"), 4)(images, out, 0.0)
    loss.backward()
    assert float(stats.grad[:, :3].max()) < -1e-4  # gradient descent raises mu


def test_encode_is_argmax_and_decode_goes_through_the_codebook():
    model = DVAE(VQConfig(**TINY)).freeze()
    x = paddle.uniform([2, 3, 32, 32], min=-1, max=1)
    ids = model.encode_to_ids(x)
    np.testing.assert_array_equal(ids.numpy(), paddle.argmax(model.encoder_logits(x), axis=1).numpy())
    one_hot = paddle.nn.functional.one_hot(ids, 16).transpose([0, 3, 1, 2])
    via_conv = model.stats_to_image(model.decoder(one_hot))
    np.testing.assert_allclose(model.decode_ids(ids).numpy(), via_conv.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["instance", "center"])
def test_default_head_is_dalle_and_normed_heads_ignore_position_constant_shifts(norm):
    # default: DALL-E's parameter names only (the converter maps them 1:1), no norm
    paddle.seed(0)
    plain = DVAE(VQConfig(**TINY))
    assert not [k for k in plain.state_dict() if "norm" in k]
    normed = DVAE(VQConfig(**TINY, dvae_logits_norm=norm, dvae_logits_init_scale=6.0))
    assert {"encoder.blocks.output.norm.weight", "encoder.blocks.output.norm.bias"} <= set(normed.state_dict())
    np.testing.assert_allclose(float(normed.encoder.blocks.output.conv.w.std()),
                               6.0 * float(plain.encoder.blocks.output.conv.w.std()), rtol=0.15)
    h = paddle.randn([2, 16, 4, 4])  # features entering the head (group width 16 at the last group)
    shift = paddle.randn([1, 16, 1, 1]) * 5.0  # the same at every position (the collapse direction)
    head_n, head_p = normed.encoder.blocks.output, plain.encoder.blocks.output
    np.testing.assert_allclose(head_n(h + shift).numpy(), head_n(h).numpy(), rtol=1e-3, atol=1e-3)
    assert float((head_p(h + shift) - head_p(h)).abs().max()) > 1e-2
    if norm == "center":  # keeps the channels' relative amplitudes (instance norm equalises them)
        h = paddle.randn([1, 16, 4, 4]) * paddle.to_tensor([10.0] + [0.1] * 15).reshape([1, 16, 1, 1])
        feat = normed.encoder.blocks.output.norm(h)
        assert float(feat[0, 0].std()) > 5 * float(feat[0, 1:].std())
    try:
        DVAE(VQConfig(**TINY, dvae_logits_norm="layer"))
    except ConfigError:
        pass
    else:
        raise AssertionError("an unknown VQ.dvae_logits_norm must be refused")


def test_dead_code_split_takes_over_part_of_a_used_codes_region():
    paddle.seed(1)
    model = DVAE(VQConfig(**TINY, dvae_logits_norm="center", dvae_logits_init_scale=6.0))
    x = paddle.uniform([2, 3, 32, 32], min=-1, max=1)
    out = model(x, 1.0, True)
    used = np.bincount(out.ids.numpy().ravel(), minlength=16) > 0
    splits = plan_code_splits(model, x, out, ~used, np.random.default_rng(0), max_splits=2)
    assert 0 < len(splits) <= 2 and all(not used[k] and used[j] for k, j, _, _ in splits)
    apply_code_splits(model, splits)
    feats = model.encoder.head_features(map_pixels((x + 1) * 0.5)).transpose([0, 2, 3, 1]).reshape([-1, 16]).numpy()
    logits = model.encoder_logits(x).transpose([0, 2, 3, 1]).reshape([-1, 16]).numpy()
    cb = model.decoder.blocks.input.w.numpy()
    for k, j, fp, centre in splits:
        p = int(np.argmin(((feats - fp) ** 2).sum(axis=1)))  # the position the split was made at
        np.testing.assert_allclose(logits[p, k] - logits[p, j], 0.5, rtol=1e-3)  # k now beats j there
        region = np.flatnonzero(out.ids.numpy().ravel() == j)
        assert (logits[region, k] < logits[region, j]).any()  # ... but not all over j's region
        np.testing.assert_array_equal(cb[:, k], cb[:, j])  # and decodes like j


@pytest.mark.parametrize("norm", ["none", "center"])
def test_dvae_stage_trains_and_checkpoint_loads(tmp_path, shapes_dir, norm):
    cfg = Config()
    cfg.Global.stage, cfg.Global.output_dir = "dvae", str(tmp_path / "run")
    cfg.VQ = VQConfig(**TINY, dvae_logits_norm=norm)
    cfg.DVAE = DVAEConfig(temp_anneal_steps=4, kl_warmup_steps=2, kl_weight_end=1.0,
                          dead_code_steps=2 if norm == "center" else 0, straight_through=norm == "center")
    cfg.Data.train_manifest, cfg.Data.val_manifest = str(shapes_dir / "train.jsonl"), str(shapes_dir / "val.jsonl")
    cfg.Data.image_size, cfg.Data.batch_size = 32, 4
    cfg.Train.max_steps, cfg.Train.eval_samples, cfg.Train.progress_bar = 4, 4, False
    result = Trainer(cfg, DVAETrainModule(cfg)).fit()
    assert "judge_all" in result["val"] and np.isfinite(result["val"]["psnr"])
    loaded = load_tokenizer(result["checkpoint"])
    assert isinstance(loaded, DVAE) and loaded.cfg.dvae_logits_norm == norm


def test_bce_recon_loss_is_zero_at_the_target_and_does_not_saturate():
    from ernie_vilg.vq.dvae_train import sigmoid_cross_entropy
    x = paddle.uniform([1, 3, 4, 4], min=-1, max=1)
    x01 = (x + 1) / 2 * 0.8 + 0.1
    mu = paddle.log(x01) - paddle.log(1 - x01)
    exact = paddle.concat([mu, paddle.zeros_like(mu)], axis=1)
    assert abs(float(sigmoid_cross_entropy(x, exact, 0.1))) < 1e-5
    assert float(sigmoid_cross_entropy(x, exact + 0.5, 0.1)) > 1e-3
    # a white target decoded at mu = -40 (sigmoid saturated): MSE on sigmoid(mu) has ~no gradient there
    images = paddle.ones([1, 3, 2, 2])
    stats = paddle.concat([paddle.full([1, 3, 2, 2], -40.0), paddle.zeros([1, 3, 2, 2])], axis=1)
    stats.stop_gradient = False
    out = DVAEOutput(logits=paddle.zeros([1, 16, 1, 1]), stats=stats, recon=DVAE.stats_to_image(stats),
                     ids=paddle.zeros([1, 1, 1], "int64"))
    loss, _ = DVAELoss(DVAEConfig(recon_loss="bce"), 4)(images, out, 0.0)
    loss.backward()
    assert float(stats.grad[:, :3].max()) < -0.5 / stats[:, :3].size  # d/dmu = (sigmoid(mu) - 0.9) / n


def test_kmeans_init_makes_the_argmax_the_nearest_centroid():
    from ernie_vilg.vq.dvae_train import kmeans_init_logits
    paddle.seed(2)
    model = DVAE(VQConfig(**TINY))
    batches = [paddle.uniform([2, 3, 32, 32], min=-1, max=1) for _ in range(2)]
    cent = kmeans_init_logits(model, batches, iters=5, seed=0, logit_std=5.0)
    x = paddle.concat(batches)
    feats = model.encoder.head_features(map_pixels((x + 1) * 0.5)).transpose([0, 2, 3, 1]).reshape([-1, 16]).numpy()
    nearest = ((feats[:, None, :] - cent[None]) ** 2).sum(-1).argmin(axis=1)
    logits = model.encoder_logits(x)
    np.testing.assert_array_equal(paddle.argmax(logits, axis=1).numpy().ravel(), nearest)
    assert len(np.unique(nearest)) > 8  # the centroids cover the batch, not one code
    np.testing.assert_allclose(float(logits.std(axis=1).mean()), 5.0, rtol=1e-3)
    cb = model.decoder.blocks.input.w.numpy()[:, :, 0, 0]  # [d, K]: the codebook follows the centroids
    near = ((cent[:, None] - cent[None]) ** 2).sum(-1)
    np.fill_diagonal(near, np.inf)
    k, j = np.unravel_index(near.argmin(), near.shape)  # the two closest centroids ...
    dist = ((cb[:, :, None] - cb[:, None, :]) ** 2).sum(0)
    assert dist[k, j] < np.median(dist)  # ... have close embeddings


def _kmeans_stage_cfg(tmp_path, shapes_dir, max_steps):
    cfg = Config()
    cfg.Global.stage, cfg.Global.output_dir = "dvae", str(tmp_path / "run")
    cfg.VQ = VQConfig(**TINY)
    cfg.DVAE = DVAEConfig(recon_loss="bce", straight_through=True, temp_end=1.0, kl_weight_end=0.0)
    cfg.DVAE.kmeans_init_batches, cfg.DVAE.kmeans_logit_std = 2, 10.0
    cfg.DVAE.encoder_freeze_steps, cfg.DVAE.encoder_lr_scale = 2, 0.1
    cfg.Data.train_manifest, cfg.Data.val_manifest = str(shapes_dir / "train.jsonl"), str(shapes_dir / "val.jsonl")
    cfg.Data.image_size, cfg.Data.batch_size = 32, 4
    cfg.Train.max_steps, cfg.Train.eval_samples, cfg.Train.progress_bar = max_steps, 4, False
    cfg.Train.save_every = 2
    return cfg


def test_kmeans_init_freeze_and_resume(tmp_path, shapes_dir, monkeypatch):
    import ernie_vilg.stages.dvae as M
    cfg = _kmeans_stage_cfg(tmp_path, shapes_dir, 2)
    calls = []
    real = M.kmeans_init_logits
    monkeypatch.setattr(M, "kmeans_init_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = Trainer(cfg, DVAETrainModule(cfg))
    assert calls == [1]
    enc0 = {k: v.numpy().copy() for k, v in trainer.inner.encoder.state_dict().items()}
    dec0 = {k: v.numpy().copy() for k, v in trainer.inner.decoder.state_dict().items()}
    assert all(p.optimize_attr["learning_rate"] == 0.1 for p in trainer.inner.encoder.parameters())
    trainer.fit()  # steps 0, 1: encoder frozen, decoder trains
    for k, v in trainer.inner.encoder.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), enc0[k])
    assert any(not np.array_equal(v.numpy(), dec0[k]) for k, v in trainer.inner.decoder.state_dict().items())
    saved = {k: v.numpy().copy() for k, v in trainer.inner.state_dict().items()}
    # resume: no second k-means init; the saved (k-means-initialised) weights are what continues
    cfg2 = _kmeans_stage_cfg(tmp_path, shapes_dir, 4)
    cfg2.Train.resume = True
    resumed = Trainer(cfg2, DVAETrainModule(cfg2))
    assert calls == [1] and resumed.step == 2
    for k, v in resumed.inner.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), saved[k])
    resumed.fit()  # steps 2, 3: the encoder trains now
    assert any(not np.array_equal(v.numpy(), enc0[k]) for k, v in resumed.inner.encoder.state_dict().items())
