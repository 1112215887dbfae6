"""VQGAN: taming layout, generator / discriminator losses, the vqgan stage under the Trainer."""
from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

from ernie_vilg.config import Config, VQConfig, VQGANConfig
from ernie_vilg.vq.registry import load_tokenizer
from ernie_vilg.training.trainer import Trainer
from ernie_vilg.vq.gan_losses import LPIPS, PatchDiscriminator, VQGANLoss, adaptive_weight, hinge_d_loss
from ernie_vilg.stages.vqgan import DISCRIMINATOR, VQGANTrainModule
from ernie_vilg.training.trainer import extra_files
from ernie_vilg.vq.vqgan import VQGAN
from shapes32_fixture import shapes_dir  # noqa: F401  (fixture)

TINY = dict(hidden_channels=8, channel_mult=[1, 2], num_res_blocks=1, downsample_factor=8, patch_size=4,
            codebook_size=16, embed_dim=8, dead_code_steps=0)


@pytest.mark.parametrize("kind", ["vqgan", "vqgan_gumbel"])
def test_tokenizer_interface_shapes(kind):
    model = VQGAN(VQConfig(kind=kind, **TINY))
    x = paddle.uniform([2, 3, 32, 32], min=-1, max=1)
    ids = model.encode_to_ids(x)
    assert list(ids.shape) == [2, 4, 4] and int(ids.max()) < 16
    assert list(model.decode_ids(ids).shape) == [2, 3, 32, 32]
    out = model(x, 0.5, 1e-3)
    assert list(out.recon.shape) == [2, 3, 32, 32] and out.quant_loss.ndim == 0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = paddle.create_parameter([3], "float32", default_initializer=paddle.nn.initializer.Assign(np.ones(3, "float32")))
    nll, g = (w * 2.0).sum(), (w * 0.5).sum()  # gradients 2 and 0.5 per element
    assert abs(float(adaptive_weight(nll, g, w, 1e4)) - 4.0) < 1e-2  # ||2|| / ||0.5||
    assert float(adaptive_weight(nll, g * 0, w, 10.0)) == 10.0  # clipped


def test_hinge_loss_and_patch_discriminator():
    assert float(hinge_d_loss(paddle.to_tensor([2.0]), paddle.to_tensor([-2.0]))) == 0.0
    assert float(hinge_d_loss(paddle.to_tensor([0.0]), paddle.to_tensor([0.0]))) == 1.0
    d = PatchDiscriminator(3, 8, 2)
    assert list(d(paddle.zeros([2, 3, 32, 32])).shape)[:2] == [2, 1]
    assert "main.3._mean" in d.state_dict() or "main.3._variance" in d.state_dict()  # BatchNorm at taming's index


def test_without_lpips_weights_the_perceptual_term_is_off_and_said(caplog):
    with caplog.at_level(logging.WARNING):
        loss = VQGANLoss.from_config(VQGANConfig(perceptual_weight=1.0, lpips_weights=""))
    assert not loss.uses_perceptual and "WITHOUT the perceptual" in caplog.text


def test_lpips_loads_converted_weights_and_measures_distance(tmp_path):
    paddle.seed(0)
    ref = LPIPS()
    paddle.save(ref.state_dict(), str(tmp_path / "lpips.pdparams"))
    lp = LPIPS.from_file(tmp_path / "lpips.pdparams")
    x = paddle.uniform([1, 3, 32, 32], min=-1, max=1)
    assert float(lp(x, x)) == 0.0 and float(lp(x, -x)) > 0
    assert all(p.stop_gradient for p in lp.parameters())


def test_vqgan_stage_trains_discriminator_separately_and_checkpoint_is_a_plain_tokenizer(tmp_path, shapes_dir):
    cfg = Config()
    cfg.Global.stage, cfg.Global.output_dir = "vqgan", str(tmp_path / "run")
    cfg.VQ = VQConfig(kind="vqgan", **TINY)
    cfg.Data.train_manifest, cfg.Data.val_manifest = str(shapes_dir / "train.jsonl"), str(shapes_dir / "val.jsonl")
    cfg.Data.image_size, cfg.Data.batch_size = 32, 4
    cfg.VQGAN.disc_start, cfg.VQGAN.disc_channels, cfg.VQGAN.disc_layers = 1, 8, 2
    cfg.Train.max_steps, cfg.Train.eval_samples, cfg.Train.progress_bar, cfg.Train.log_every = 3, 4, False, 1
    module = VQGANTrainModule(cfg)
    d_before = {k: v.numpy().copy() for k, v in module.discriminator.state_dict().items()}
    result = Trainer(cfg, module).fit()
    assert "judge_all" in result["val"]
    assert any(not np.array_equal(d_before[k], v.numpy()) for k, v in module.discriminator.state_dict().items())
    tok = load_tokenizer(result["checkpoint"])  # strict: no discriminator keys in model.pdparams
    assert isinstance(tok, VQGAN)
    from pathlib import Path
    assert (Path(result["checkpoint"]) / extra_files(DISCRIMINATOR)[0]).is_file()
    # the Trainer owns the discriminator's optimizer: a resumed run restores both, exactly
    trained = {k: v.numpy().copy() for k, v in module.discriminator.state_dict().items()}
    cfg.Train.max_steps = 4
    resumed_module = VQGANTrainModule(cfg)
    resumed = Trainer(cfg, resumed_module)
    assert resumed.step == 3
    assert all(np.array_equal(trained[k], v.numpy()) for k, v in resumed_module.discriminator.state_dict().items())
    moments = [k for k in resumed.extra_optimizers[DISCRIMINATOR].state_dict() if "moment1" in k]
    assert moments  # the AdamW state came back too, not a fresh optimizer
