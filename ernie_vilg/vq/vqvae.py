"""VQVAE image tokenizer (ERNIE-ViLG Eq. 2): x_hat = G(C(q(E(x)))).

Encoder E: conv stem -> per level `num_res_blocks` residual blocks, then a stride-2 conv between
levels (log2(f) downsamples) -> middle residual block -> GroupNorm/SiLU -> 1x1 conv to embed_dim.
Decoder G mirrors it, with nearest-neighbour x2 upsampling + 3x3 conv instead of strided convs.

With `patch_size` p > 1 the stem first folds p x p pixel patches into channels (space-to-depth,
[B, 3, H, W] -> [B, 3p^2, H/p, W/p]) and the decoder unfolds its last conv's output with a pixel
shuffle; p counts towards f, so there are log2(f / p) strided downsamples. On CPU this removes
the full-resolution layers, which dominate the cost of a small VQVAE.
The losses live in `vq/losses.py`; this file only computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.config import ConfigError, VQConfig
from ernie_vilg.vq.base import ImageTokenizer
from ernie_vilg.vq.quantizer import QuantizerInfo, VectorQuantizer


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups as usual from 128 channels up; narrower layers keep >= 4 channels per group
    # (1-channel groups are instance norm, which erases the mostly-empty maps of sparse images)
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


class ResBlock(nn.Layer):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2D(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2D(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2D(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Layer):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2D(in_ch, out_ch, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # nearest + conv instead of a transposed conv: no checkerboard artefacts
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _is_pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def level_channels(cfg: VQConfig) -> list[int]:
    """Channels of each resolution level, after checking f, patch_size and channel_mult agree
    (f = patch_size * 2^(levels - 1)); shared by the VQVAE, VQGAN and dVAE encoders / decoders."""
    f, p = cfg.downsample_factor, cfg.patch_size
    if f < 2 or not _is_pow2(f):
        raise ConfigError(f"VQ.downsample_factor: must be a power of two (4 / 8 / 16), got {f}")
    if not _is_pow2(p) or p > f:
        raise ConfigError(f"VQ.patch_size: must be a power of two <= downsample_factor ({f}), got {p}")
    levels = int(math.log2(f // p))
    if len(cfg.channel_mult) != levels + 1:
        raise ConfigError(
            f"VQ.channel_mult: has {len(cfg.channel_mult)} entries but downsample_factor={f} with "
            f"patch_size={p} needs log2(f / patch_size) + 1 = {levels + 1} (one per resolution level)"
        )
    if cfg.hidden_channels < 1 or cfg.num_res_blocks < 1 or min(cfg.channel_mult) < 1:
        raise ConfigError("VQ: hidden_channels, num_res_blocks and channel_mult entries must be >= 1")
    return [cfg.hidden_channels * m for m in cfg.channel_mult]


class Encoder(nn.Layer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        chs = level_channels(cfg)
        self.patch_size = cfg.patch_size
        self.stem = nn.Conv2D(cfg.in_channels * cfg.patch_size**2, chs[0], 3, padding=1)
        layers: list[nn.Layer] = []
        in_ch = chs[0]
        for level, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(in_ch, ch))
                in_ch = ch
            if level < len(chs) - 1:
                layers.append(nn.Conv2D(ch, ch, 4, stride=2, padding=1))  # H -> H/2
        layers += [ResBlock(in_ch, in_ch), _norm(in_ch), nn.Silu(), nn.Conv2D(in_ch, cfg.embed_dim, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)  # [B, 3, H, W] -> [B, 3p^2, H/p, W/p]
        return self.body(self.stem(x))  # -> [B, d, H/f, W/f]


class Decoder(nn.Layer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        chs = level_channels(cfg)[::-1]  # coarsest level first
        self.patch_size = cfg.patch_size
        in_ch = chs[0]
        layers: list[nn.Layer] = [nn.Conv2D(cfg.embed_dim, in_ch, 3, padding=1), ResBlock(in_ch, in_ch)]
        for level, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(in_ch, ch))
                in_ch = ch
            if level < len(chs) - 1:
                # the conv after upsampling already narrows to the finer level's width
                layers.append(Upsample(ch, chs[level + 1]))  # h -> 2h
                in_ch = chs[level + 1]
        layers += [_norm(in_ch), nn.Silu()]
        self.body = nn.Sequential(*layers)
        self.conv_out = nn.Conv2D(in_ch, cfg.in_channels * cfg.patch_size**2, 3, padding=1)

    def forward(self, z: paddle.Tensor) -> paddle.Tensor:
        x = self.conv_out(self.body(z))  # [B, d, h, w] -> [B, 3p^2, H/p, W/p]
        if self.patch_size > 1:
            x = F.pixel_shuffle(x, self.patch_size)  # -> [B, 3, H, W]
        return x


@dataclass
class VQVAEOutput:
    recon: paddle.Tensor  # [B, 3, H, W], not clipped (the loss sees the raw output)
    quant_loss: paddle.Tensor  # scalar codebook + commitment loss (Eq. 1, last two terms)
    ids: paddle.Tensor  # [B, h, w] int64
    info: QuantizerInfo


class VQVAE(ImageTokenizer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        if cfg.in_channels != 3:
            raise ConfigError(f"VQ.in_channels: the tokenizer interface is for RGB images, got {cfg.in_channels}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(
            codebook_size=cfg.codebook_size,
            embed_dim=cfg.embed_dim,
            beta=cfg.beta,
            use_ema=cfg.use_ema,
            ema_decay=cfg.ema_decay,
            dead_code_steps=cfg.dead_code_steps,
            l2_normalize=cfg.l2_normalize,
        )
        self.decoder = Decoder(cfg)

    def forward(self, x: paddle.Tensor) -> VQVAEOutput:
        q = self.quantizer(self.encoder(x))
        return VQVAEOutput(recon=self.decoder(q.z_q), quant_loss=q.loss, ids=q.ids, info=q.info)

    def embed_ids(self, ids: paddle.Tensor) -> paddle.Tensor:
        return self.quantizer.embed_ids(ids)

    def decode_embeddings(self, z_emb: paddle.Tensor) -> paddle.Tensor:
        """z_emb [B, d, h, w] -> images [B, 3, H, W] (differentiable; the end-to-end path)."""
        return self.decoder(z_emb)

    def _encode_ids(self, images: paddle.Tensor) -> paddle.Tensor:
        return self.quantizer.lookup_ids(self.encoder(images))

    def _decode_ids(self, ids: paddle.Tensor) -> paddle.Tensor:
        return self.decoder(self.embed_ids(ids))

    def get_last_layer(self) -> paddle.Tensor:
        """Weight of the decoder's output conv (VQGAN's adaptive GAN weight is computed on it)."""
        return self.decoder.conv_out.weight
