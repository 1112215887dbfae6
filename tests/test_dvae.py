"""dVAE (DALL-E): relaxation, schedules, logit-Laplace loss, argmax ids, the dvae stage."""
from __future__ import annotations

import math

import numpy as np
import paddle

from ernie_vilg.config import Config, DVAEConfig, VQConfig
from ernie_vilg.models.e2e import load_image_tokenizer
from ernie_vilg.training.trainer import Trainer
from ernie_vilg.vq.dvae import DVAE, cosine_schedule, kl_to_uniform, relaxed_one_hot
from ernie_vilg.vq.dvae_module import DVAETrainModule, logit_laplace_nll
from issue6_fixtures import shapes_dir  # noqa: F401  (fixture)

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


def test_encode_is_argmax_and_decode_goes_through_the_codebook():
    model = DVAE(VQConfig(**TINY)).freeze()
    x = paddle.uniform([2, 3, 32, 32], min=-1, max=1)
    ids = model.encode_to_ids(x)
    np.testing.assert_array_equal(ids.numpy(), paddle.argmax(model.encoder_logits(x), axis=1).numpy())
    one_hot = paddle.nn.functional.one_hot(ids, 16).transpose([0, 3, 1, 2])
    via_conv = model.stats_to_image(model.decoder(one_hot))
    np.testing.assert_allclose(model.decode_ids(ids).numpy(), via_conv.numpy(), rtol=1e-5, atol=1e-5)


def test_dvae_stage_trains_and_checkpoint_loads(tmp_path, shapes_dir):
    cfg = Config()
    cfg.Global.stage, cfg.Global.output_dir = "dvae", str(tmp_path / "run")
    cfg.VQ = VQConfig(**TINY)
    cfg.DVAE = DVAEConfig(temp_anneal_steps=4, kl_warmup_steps=2, kl_weight_end=1.0)
    cfg.Data.train_manifest, cfg.Data.val_manifest = str(shapes_dir / "train.jsonl"), str(shapes_dir / "val.jsonl")
    cfg.Data.image_size, cfg.Data.batch_size = 32, 4
    cfg.Train.max_steps, cfg.Train.eval_samples, cfg.Train.progress_bar = 4, 4, False
    result = Trainer(cfg, DVAETrainModule(cfg)).fit()
    assert "judge_all" in result["val"] and np.isfinite(result["val"]["psnr"])
    assert isinstance(load_image_tokenizer(result["checkpoint"]), DVAE)
