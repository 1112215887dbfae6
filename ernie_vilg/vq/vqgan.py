"""VQGAN image tokenizer (ERNIE-ViLG sec. 4.1; Esser et al. 2021), the network only.

The layout follows taming-transformers' `Encoder` / `Decoder` / `VQModel` block for block and
parameter name for parameter name, so that `convert/taming.py` maps a published `model.ckpt` by a
short table (x is images, z the latent grid):

    encoder: conv_in -> down[i].block[j] (+ down[i].attn[j] at the coarsest level)
             -> down[i].downsample (not after the last level) -> mid.block_1, mid.attn_1,
             mid.block_2 -> norm_out, swish, conv_out            x [B,3,H,W] -> [B, d, H/f, W/f]
    quant_conv (1x1) -> quantizer -> post_quant_conv (1x1)
    decoder: conv_in -> mid -> up[i].block[0..num_res_blocks] (+ attn at the coarsest level)
             -> up[i].upsample (not after level 0), coarsest level first -> norm_out, swish, conv_out

Choices taken from the published models rather than from config fields:
  * attention runs at the coarsest level only (+ the middle blocks), which is where both released
    taming models put it (attn_resolutions [16] at f16, [32] at f8, with 256 px images);
  * z_channels == VQ.embed_dim (true of both released models: 256 / 256);
  * GroupNorm eps 1e-6; groups = gcd(32, channels / 4), i.e. 32 from 128 channels up as in taming,
    fewer on the narrow shapes-scale nets (see vqvae._norm).
`VQ.patch_size` p > 1 folds p x p pixel patches into channels before conv_in and unfolds after
conv_out (as the VQVAE does; p = 1 for converted weights).

Two quantizers, by `VQ.kind`:
  * `vqgan`: nearest codebook entry (`vq/quantizer.VectorQuantizer`, taming VectorQuantizer2);
  * `vqgan_gumbel`: gumbel-softmax over `proj(z)` logits, codes `embed` (taming GumbelQuantize,
    the f8 / 8192 release). Encoding to ids takes the argmax of the logits (deterministic).
Losses (perceptual, patch GAN) live in `vq/gan_losses.py`; this file never imports them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.config import ConfigError, VQConfig
from ernie_vilg.vq.base import ImageTokenizer
from ernie_vilg.vq.vqvae import level_channels
from ernie_vilg.vq.quantizer import QuantizerInfo, VectorQuantizer, _perplexity

Tensor = paddle.Tensor
QUANTIZERS = ("vqgan", "vqgan_gumbel")


def normalize(channels: int) -> nn.GroupNorm:
    # taming uses 32 groups (all its widths are >= 128); narrower nets keep >= 4 channels a group
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels, epsilon=1e-6)


def swish(x: Tensor) -> Tensor:
    return x * F.sigmoid(x)


class ResnetBlock(nn.Layer):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = normalize(in_ch)
        self.conv1 = nn.Conv2D(in_ch, out_ch, 3, padding=1)
        self.norm2 = normalize(out_ch)
        self.conv2 = nn.Conv2D(out_ch, out_ch, 3, padding=1)
        # taming's name for the 1x1 skip projection
        self.nin_shortcut = nn.Conv2D(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Layer):
    """Single-head self-attention over all positions of a feature map (1x1 conv q, k, v)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = normalize(ch)
        self.q = nn.Conv2D(ch, ch, 1)
        self.k = nn.Conv2D(ch, ch, 1)
        self.v = nn.Conv2D(ch, ch, 1)
        self.proj_out = nn.Conv2D(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h_ = self.norm(x)
        b, c, h, w = x.shape
        q = self.q(h_).reshape([b, c, h * w]).transpose([0, 2, 1])  # [B, hw, c]
        k = self.k(h_).reshape([b, c, h * w])  # [B, c, hw]
        v = self.v(h_).reshape([b, c, h * w])  # [B, c, hw]
        attn = F.softmax(paddle.bmm(q, k) * (c ** -0.5), axis=2)  # [B, hw_q, hw_k]
        out = paddle.bmm(v, attn.transpose([0, 2, 1])).reshape([b, c, h, w])  # [B, c, hw_q] -> map
        return x + self.proj_out(out)


class Downsample(nn.Layer):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2D(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # taming pads right / bottom only (asymmetric) before the stride-2 3x3 conv
        return self.conv(F.pad(x, [0, 1, 0, 1]))  # paddle order: [left, right, top, bottom]


class Upsample(nn.Layer):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2D(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Layer):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Layer):
    """One resolution level: `block` (+ `attn`) lists and an optional resampler."""

    def __init__(self, blocks: list[nn.Layer], attns: list[nn.Layer], resample: Optional[nn.Layer],
                 resample_name: str) -> None:
        super().__init__()
        self.block = nn.LayerList(blocks)
        self.attn = nn.LayerList(attns)
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)  # taming's names: downsample / upsample

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class TamingEncoder(nn.Layer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        chs = level_channels(cfg)
        self.patch_size = cfg.patch_size
        self.conv_in = nn.Conv2D(cfg.in_channels * cfg.patch_size ** 2, chs[0], 3, padding=1)
        levels, in_ch = [], chs[0]
        for i, ch in enumerate(chs):
            last = i == len(chs) - 1
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(in_ch, ch))
                in_ch = ch
            attns = [AttnBlock(ch) for _ in blocks] if last else []
            levels.append(_Level(blocks, attns, None if last else Downsample(ch), "downsample"))
        self.down = nn.LayerList(levels)
        self.mid = _Mid(in_ch)
        self.norm_out = normalize(in_ch)
        self.conv_out = nn.Conv2D(in_ch, cfg.embed_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)  # [B, 3, H, W] -> [B, 3p^2, H/p, W/p]
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))  # [B, d, H/f, W/f]


class TamingDecoder(nn.Layer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        chs = level_channels(cfg)
        self.patch_size = cfg.patch_size
        in_ch = chs[-1]
        self.conv_in = nn.Conv2D(cfg.embed_dim, in_ch, 3, padding=1)
        self.mid = _Mid(in_ch)
        levels: list[Optional[_Level]] = [None] * len(chs)
        for i in reversed(range(len(chs))):  # coarsest first; stored at its level index like taming
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(in_ch, chs[i]))
                in_ch = chs[i]
            attns = [AttnBlock(chs[i]) for _ in blocks] if i == len(chs) - 1 else []
            levels[i] = _Level(blocks, attns, Upsample(in_ch) if i > 0 else None, "upsample")
        self.up = nn.LayerList(levels)
        self.norm_out = normalize(in_ch)
        self.conv_out = nn.Conv2D(in_ch, cfg.in_channels * cfg.patch_size ** 2, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        x = self.conv_out(swish(self.norm_out(h)))
        if self.patch_size > 1:
            x = F.pixel_shuffle(x, self.patch_size)
        return x  # [B, 3, H, W]


class GumbelQuantizer(nn.Layer):
    """taming GumbelQuantize: logits = proj(z) over K codes; z_q = relaxed one-hot @ embed."""

    def __init__(self, in_dim: int, codebook_size: int, embed_dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2D(in_dim, codebook_size, 1)
        self.embed = nn.Embedding(codebook_size, embed_dim)

    def forward(self, z: Tensor, temperature: float, kl_weight: float, hard: bool = False) -> "QuantOut":
        from ernie_vilg.vq.dvae import kl_to_uniform, relaxed_one_hot

        logits = self.proj(z)  # [B, K, h, w]
        soft = relaxed_one_hot(logits, temperature, hard)  # [B, K, h, w]
        z_q = paddle.einsum("bkhw,kd->bdhw", soft, self.embed.weight)
        ids = paddle.argmax(logits, axis=1)
        counts = paddle.bincount(ids.flatten(), minlength=self.codebook_size).astype("float32")
        info = QuantizerInfo(perplexity=_perplexity(counts).detach(),
                             codes_used=(counts > 0).astype("float32").mean().detach())
        return QuantOut(z_q, kl_weight * kl_to_uniform(logits), ids, info)

    def lookup_ids(self, z: Tensor) -> Tensor:
        return paddle.argmax(self.proj(z), axis=1)

    def embed_ids(self, ids: Tensor) -> Tensor:
        return self.embed(ids).transpose([0, 3, 1, 2])  # [B, h, w, d] -> [B, d, h, w]


@dataclass
class QuantOut:
    z_q: Tensor
    loss: Tensor
    ids: Tensor
    info: QuantizerInfo


@dataclass
class VQGANOutput:
    recon: Tensor  # [B, 3, H, W], raw decoder output
    quant_loss: Tensor  # scalar: codebook + commitment (vqgan) or weighted KL (vqgan_gumbel)
    ids: Tensor  # [B, h, w]
    info: QuantizerInfo


class VQGAN(ImageTokenizer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        if cfg.kind not in QUANTIZERS:
            raise ConfigError(f"VQ.kind: VQGAN builds {QUANTIZERS}, got {cfg.kind!r}")
        if cfg.in_channels != 3:
            raise ConfigError(f"VQ.in_channels: the tokenizer interface is for RGB images, got {cfg.in_channels}")
        self.cfg = cfg
        self.gumbel = cfg.kind == "vqgan_gumbel"
        self.encoder = TamingEncoder(cfg)
        self.quant_conv = nn.Conv2D(cfg.embed_dim, cfg.embed_dim, 1)
        if self.gumbel:
            self.quantizer = GumbelQuantizer(cfg.embed_dim, cfg.codebook_size, cfg.embed_dim)
        else:
            self.quantizer = VectorQuantizer(
                codebook_size=cfg.codebook_size, embed_dim=cfg.embed_dim, beta=cfg.beta, use_ema=cfg.use_ema,
                ema_decay=cfg.ema_decay, dead_code_steps=cfg.dead_code_steps, l2_normalize=cfg.l2_normalize)
        self.post_quant_conv = nn.Conv2D(cfg.embed_dim, cfg.embed_dim, 1)
        self.decoder = TamingDecoder(cfg)

    def forward(self, x: Tensor, temperature: float = 1.0, kl_weight: float = 0.0) -> VQGANOutput:
        """Training forward; `temperature` / `kl_weight` are used by the gumbel quantizer only."""
        h = self.quant_conv(self.encoder(x))
        if self.gumbel:
            q = self.quantizer(h, temperature, kl_weight)
        else:
            q = self.quantizer(h)
        return VQGANOutput(recon=self.decode_embeddings(q.z_q), quant_loss=q.loss, ids=q.ids, info=q.info)

    def embed_ids(self, ids: Tensor) -> Tensor:
        return self.quantizer.embed_ids(ids)

    def decode_embeddings(self, z_emb: Tensor) -> Tensor:
        """z_emb [B, d, h, w] (codebook vectors) -> images (differentiable)."""
        return self.decoder(self.post_quant_conv(z_emb))

    def _encode_ids(self, images: Tensor) -> Tensor:
        return self.quantizer.lookup_ids(self.quant_conv(self.encoder(images)))

    def _decode_ids(self, ids: Tensor) -> Tensor:
        return self.decode_embeddings(self.embed_ids(ids))

    def get_last_layer(self) -> Tensor:
        """The decoder's output conv weight: the adaptive GAN weight is measured on its gradients."""
        return self.decoder.conv_out.weight

    def usage_stats(self) -> dict[str, float]:
        return self.quantizer.usage_stats() if not self.gumbel else {}


def build_vqgan(vq_cfg: VQConfig) -> ImageTokenizer:
    """Registry entry for VQ.kind in ("vqgan", "vqgan_gumbel")."""
    return VQGAN(vq_cfg)
