"""VQGAN training losses: pixel + LPIPS perceptual + patch-GAN (hinge) with an adaptive weight.

    nll    = pixel_weight * |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)       (means)
    g_loss = -mean(D(x_hat))                                        (generator's hinge term)
    lambda = disc_weight * ||grad_L nll|| / (||grad_L g_loss|| + 1e-4), clipped to
             [0, adaptive_weight_max], L = the decoder's last layer (VQGAN eq. 7)
    loss   = nll + lambda * [step >= disc_start] * g_loss + codebook_weight * quant_loss
    d_loss = 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(sg[x_hat]))))  (discriminator hinge)

The perceptual network is VGG16 `features` cut after relu1_2 / relu2_2 / relu3_3 / relu4_3 /
relu5_3, unit-normalised per position, squared differences weighted by the 1x1 "lin" heads of
LPIPS and averaged over space. Parameter names follow the LPIPS module inside taming's
checkpoints (`net.slice1.0.weight`, `lin0.model.1.weight`, `scaling_layer.shift`), so
`convert/taming.py` can extract it from any VQGAN `model.ckpt`. Without a weights file the
perceptual term is dropped (with a warning): LPIPS with random VGG weights is not a perceptual
metric. The discriminator follows pix2pix / taming `NLayerDiscriminator` (BatchNorm,
LeakyReLU 0.2, 4x4 kernels, N(0, 0.02) init) and its keys (`main.<index>`).

Nothing here imports the tokenizer: the only coupling is `last_layer` (VQGAN.get_last_layer()).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.config import ConfigError, VQGANConfig

log = logging.getLogger(__name__)
Tensor = paddle.Tensor

# torchvision vgg16.features: (index, in, out) of each conv; a ReLU follows each; pools at 4, 9, 16, 23
_VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
              (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
              (26, 512, 512), (28, 512, 512)]
_VGG_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # feature indices [start, stop) per slice
_LPIPS_CHANNELS = [64, 128, 256, 512, 512]


def _vgg_layer(index: int) -> nn.Layer:
    if index in (4, 9, 16, 23):
        return nn.MaxPool2D(kernel_size=2, stride=2)
    for i, n_in, n_out in _VGG_CONVS:
        if i == index:
            return nn.Conv2D(n_in, n_out, 3, padding=1)
    return nn.ReLU()


class VGG16Slices(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        for s, (start, stop) in enumerate(_VGG_SLICES):
            setattr(self, f"slice{s + 1}", nn.Sequential(*[(str(i), _vgg_layer(i)) for i in range(start, stop)]))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for s in range(len(_VGG_SLICES)):
            x = getattr(self, f"slice{s + 1}")(x)
            feats.append(x)
        return feats


class _NetLin(nn.Layer):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # index 0 is LPIPS' dropout (inactive here: the loss net runs in eval mode)
        self.model = nn.Sequential(("0", nn.Dropout(0.5)), ("1", nn.Conv2D(channels, 1, 1, bias_attr=False)))


class _ScalingLayer(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        # LPIPS' input normalisation constants (images in [-1, 1])
        self.register_buffer("shift", paddle.to_tensor([-0.030, -0.088, -0.188]).reshape([1, 3, 1, 1]))
        self.register_buffer("scale", paddle.to_tensor([0.458, 0.448, 0.450]).reshape([1, 3, 1, 1]))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class LPIPS(nn.Layer):
    """Learned perceptual distance over VGG16 features; frozen, always in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = VGG16Slices()
        for i, ch in enumerate(_LPIPS_CHANNELS):
            setattr(self, f"lin{i}", _NetLin(ch))

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """Load converted weights (a .pdparams of this layer's state dict) strictly, and freeze."""
        from ernie_vilg.safe_pickle import safe_load

        model = cls()
        state = safe_load(Path(path))
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(f"VQGAN.lpips_weights: {path} does not hold LPIPS weights "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.set_state_dict(state)
        model.eval()
        for p in model.parameters():
            p.stop_gradient = True
        return model

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y [B, 3, H, W] in [-1, 1] -> distance [B]."""
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (paddle.sqrt((a * a).sum(axis=1, keepdim=True)) + 1e-10)
            b = b / (paddle.sqrt((b * b).sum(axis=1, keepdim=True)) + 1e-10)
            total = total + getattr(self, f"lin{i}").model((a - b) ** 2).mean(axis=[1, 2, 3])
        return total


class PatchDiscriminator(nn.Layer):
    """pix2pix / taming NLayerDiscriminator: a map of real / fake logits, one per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ConfigError(f"VQGAN.disc_layers: must be >= 1, got {n_layers}")
        conv_init = paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 0.02))
        bn_init = paddle.ParamAttr(initializer=nn.initializer.Normal(1.0, 0.02))
        layers: list[nn.Layer] = [nn.Conv2D(in_channels, channels, 4, stride=2, padding=1, weight_attr=conv_init),
                                  nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution
            layers += [nn.Conv2D(channels * prev, channels * mult, 4, stride=stride, padding=1,
                                 weight_attr=conv_init, bias_attr=False),
                       nn.BatchNorm2D(channels * mult, weight_attr=bn_init), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2D(channels * mult, 1, 4, stride=1, padding=1, weight_attr=conv_init))
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # [B, 1, h', w']


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float) -> Tensor:
    """||d nll / d L|| / (||d g_loss / d L|| + 1e-4), detached: balances the GAN term against the
    reconstruction at the one layer both act on (VQGAN eq. 7)."""
    nll_grad = paddle.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = paddle.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = paddle.linalg.norm(nll_grad) / (paddle.linalg.norm(g_grad) + 1e-4)
    return paddle.clip(weight, 0.0, max_weight).detach()


class VQGANLoss(nn.Layer):
    """Generator-side loss of a VQGAN step; the discriminator is passed in, never owned."""

    def __init__(self, cfg: VQGANConfig, lpips: Optional[LPIPS] = None) -> None:
        super().__init__()
        if cfg.pixel_loss not in ("l1", "mse"):
            raise ConfigError(f"VQGAN.pixel_loss: 'l1' or 'mse', got {cfg.pixel_loss!r}")
        self.cfg = cfg
        self.lpips = lpips

    @classmethod
    def from_config(cls, cfg: VQGANConfig) -> "VQGANLoss":
        """With VQGAN.perceptual_weight > 0 and no weights file, warn and train without LPIPS."""
        lpips = None
        if cfg.perceptual_weight > 0:
            if cfg.lpips_weights:
                lpips = LPIPS.from_file(cfg.lpips_weights)
            else:
                log.warning("VQGAN.lpips_weights is empty: training WITHOUT the perceptual (LPIPS) term. "
                            "Convert VGG16/LPIPS weights offline (tools/convert_checkpoint.py taming "
                            "--lpips-out) and set VQGAN.lpips_weights to use it.")
        return cls(cfg, lpips)

    @property
    def uses_perceptual(self) -> bool:
        return self.lpips is not None and self.cfg.perceptual_weight > 0

    def forward(self, images: Tensor, recon: Tensor, quant_loss: Tensor, last_layer: Tensor,
                discriminator: Optional[nn.Layer], step: int) -> tuple[Tensor, dict[str, float]]:
        c = self.cfg
        diff = recon - images
        pixel = diff.abs().mean() if c.pixel_loss == "l1" else (diff * diff).mean()
        nll = c.pixel_weight * pixel
        logs = {"pixel_loss": float(pixel), "quant_loss": float(quant_loss)}
        if self.uses_perceptual:
            p_loss = self.lpips(images, recon).mean()
            nll = nll + c.perceptual_weight * p_loss
            logs["p_loss"] = float(p_loss)
        loss = nll + c.codebook_weight * quant_loss
        if discriminator is not None and step >= c.disc_start:
            g_loss = -discriminator(recon).mean()
            d_weight = c.disc_weight * adaptive_weight(nll, g_loss, last_layer, c.adaptive_weight_max)
            loss = loss + d_weight * g_loss
            logs.update(g_loss=float(g_loss), d_weight=float(d_weight))
        logs["nll_loss"] = float(nll)
        return loss, logs
