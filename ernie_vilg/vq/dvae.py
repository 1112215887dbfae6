"""Discrete VAE image tokenizer (DALL-E, Ramesh et al. 2021), the network and its relaxation.

The layout and parameter names follow OpenAI's `dall_e` package, so `convert/dalle.py` maps the
published `encoder.pkl` / `decoder.pkl` one to one:

    encoder  blocks.input (7x7 conv) -> blocks.group_g.block_b (g = 1..G, b = 1..num_res_blocks)
             with blocks.group_g.pool (2x2 max pool) after every group but the last
             -> blocks.output.conv (1x1) -> logits over the K codes     [B, K, H/f, W/f]
    decoder  blocks.input (1x1 conv K -> embed_dim, i.e. the codebook) -> groups with nearest x2
             blocks.group_g.upsample after every group but the last -> blocks.output.conv (1x1)
             -> 2 x 3 channels: mu (logit space) and log b of a logit-Laplace distribution
    block    x -> id_path(x) + post_gain * res_path(x), post_gain = 1 / (G * num_res_blocks)^2,
             res_path = relu, conv, relu, conv, relu, conv, relu, conv (pre-activation; hidden
             width n_out / 4; kernels 3,3,3,1 in the encoder, 1,3,3,3 in the decoder)

Convolutions keep DALL-E's parameter names `w` / `b`. Widths: group g has hidden_channels x
channel_mult[g] channels (DALL-E: 256 x [1, 2, 4, 8], decoder in reverse order); embed_dim is the
decoder's n_init (128), codebook_size its vocab (8192), f = patch_size * 2^(G - 1).

Pixels: the tokenizer interface takes images in [-1, 1]; they are moved to [0, 1] and then into
[eps, 1 - eps] (DALL-E `map_pixels`, eps = 0.1) before the encoder; the decoder's image is
sigmoid(mu) mapped back (`unmap_pixels`, clipped to [0, 1]) and returned in [-1, 1].

Two options that are NOT DALL-E (off by default, so the published weights convert unchanged;
docs/tokenizers.md, "dVAE", says why the shapes-world config needs them): VQ.dvae_logits_norm =
"instance" puts a per-channel GroupNorm (`blocks.output.norm`) and "center" a `CenterNorm` (per-channel
centring, one scale) before the head's relu and logits conv, and VQ.dvae_logits_init_scale multiplies the logits conv's init std.

The codebook: `embed_ids(ids)` is the decoder's input conv applied to one-hot ids, i.e. column
`ids` of its weight plus its bias; `decode_embeddings` runs the rest of the decoder. During
training the one-hot is relaxed with gumbel-softmax (`relaxed_one_hot`); `encode_to_ids` takes
the argmax of the encoder's logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.config import ConfigError, DVAEConfig, VQConfig
from ernie_vilg.vq.base import ImageTokenizer
from ernie_vilg.vq.vqvae import level_channels

Tensor = paddle.Tensor
LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels epsilon (the converter's weights expect it)
LOGITS_NORMS = ("none", "instance", "center")  # VQ.dvae_logits_norm


# ------------------------------------------------------------------ relaxation (shared with VQGAN)
def relaxed_one_hot(logits: Tensor, temperature: float, hard: bool = False) -> Tensor:
    """Gumbel-softmax over axis 1 of [B, K, h, w] logits (hard: one-hot forward, soft gradient)."""
    if temperature <= 0:
        raise ValueError(f"gumbel temperature must be > 0, got {temperature}")
    u = paddle.uniform(logits.shape, min=1e-10, max=1.0)
    gumbel = -paddle.log(-paddle.log(u))
    soft = F.softmax((logits + gumbel) / temperature, axis=1)
    if not hard:
        return soft
    hard_one_hot = F.one_hot(paddle.argmax(soft, axis=1), logits.shape[1]).transpose([0, 3, 1, 2])
    return soft + (hard_one_hot - soft).detach()  # straight-through


def kl_to_uniform(logits: Tensor) -> Tensor:
    """Mean over positions of KL(softmax(logits) || uniform over K) = sum q log(q K)."""
    k = logits.shape[1]
    # logits - logsumexp, not F.log_softmax(axis=1): Paddle's CPU log_softmax over a non-last axis
    # is ~30x slower (1.6 s forward for [16, 512, 16, 16] at one thread) and dominated the step
    log_q = logits - paddle.logsumexp(logits, axis=1, keepdim=True)
    return (log_q.exp() * (log_q + math.log(k))).sum(axis=1).mean()


def cosine_schedule(step: int, start: float, end: float, steps: int) -> float:
    """start -> end along half a cosine over `steps` steps, then constant (DALL-E's schedules)."""
    if steps <= 0 or step >= steps:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def gumbel_schedule(dvae_cfg: DVAEConfig, step: int) -> tuple[float, float]:
    """(gumbel temperature, KL weight) at `step`, from a DVAE config section."""
    v = dvae_cfg
    return (cosine_schedule(step, v.temp_start, v.temp_end, v.temp_anneal_steps),
            cosine_schedule(step, v.kl_weight_start, v.kl_weight_end, v.kl_warmup_steps))


def map_pixels(x01: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    return (1.0 - 2.0 * eps) * x01 + eps


def unmap_pixels(x: Tensor, eps: float | None = None) -> Tensor:
    # eps resolved in the body: paddle.jit.to_static (the vq_decoder export) re-executes the def in
    # a module where a default naming this module's constant is undefined
    eps = LOGIT_LAPLACE_EPS if eps is None else eps
    return paddle.clip((x - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


# ------------------------------------------------------------------ network
class DalleConv(nn.Layer):
    """Same-padded conv with DALL-E's parameter names `w` [out, in, k, k] and `b` [out]."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.kw = kw
        self.w = self.create_parameter(
            [n_out, n_in, kw, kw], default_initializer=nn.initializer.Normal(std=1.0 / math.sqrt(n_in * kw * kw)))
        self.b = self.create_parameter([n_out], is_bias=True, default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class _Block(nn.Layer):
    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        if n_out % 4:
            raise ConfigError(f"dVAE block width {n_out} must be divisible by 4")
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers ** 2  # keeps the residual stream's scale at init
        self.id_path = DalleConv(n_in, n_out, 1) if n_in != n_out else None
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        self.res_path = nn.Sequential(*[
            item for i, kw in enumerate(kernels)
            for item in ((f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", DalleConv(widths[i], widths[i + 1], kw)))
        ])

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.id_path is None else self.id_path(x)
        return skip + self.post_gain * self.res_path(x)


class CenterNorm(nn.Layer):
    """NOT DALL-E (VQ.dvae_logits_norm = "center"): subtract each channel's mean over the image's
    positions, divide by ONE scale (the rms over channels and positions), then a per-channel affine.

    The centring removes the position-common shift behind the one-code collapse, like "instance";
    unlike "instance" (GroupNorm with a group per channel) it keeps the channels' relative
    amplitudes. Instance norm scales each channel to unit variance within the image, so a channel
    that barely responds to this image's object colour is blown up as much as the one that does:
    its shapes-world runs reconstructed grey blobs (judge colour 5 %)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([channels], default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter([channels], is_bias=True, default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x: Tensor) -> Tensor:
        x = x - x.mean(axis=[2, 3], keepdim=True)
        x = x / paddle.sqrt((x * x).mean(axis=[1, 2, 3], keepdim=True) + self.eps)
        return x * self.weight.reshape([1, -1, 1, 1]) + self.bias.reshape([1, -1, 1, 1])


class DVAEEncoder(nn.Layer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths = level_channels(cfg)
        n_layers = len(widths) * cfg.num_res_blocks
        self.patch_size = cfg.patch_size
        items: list[tuple[str, nn.Layer]] = [("input", DalleConv(cfg.in_channels * cfg.patch_size ** 2, widths[0], 7))]
        n_in = widths[0]
        for g, width in enumerate(widths):
            group: list[tuple[str, nn.Layer]] = []
            for i in range(cfg.num_res_blocks):
                group.append((f"block_{i + 1}", _Block(n_in, width, n_layers, (3, 3, 3, 1))))
                n_in = width
            if g < len(widths) - 1:
                group.append(("pool", nn.MaxPool2D(kernel_size=2)))
            items.append((f"group_{g + 1}", nn.Sequential(*group)))
        if cfg.dvae_logits_norm not in LOGITS_NORMS:
            raise ConfigError(f"VQ.dvae_logits_norm: one of {LOGITS_NORMS}, got {cfg.dvae_logits_norm!r}")
        head: list[tuple[str, nn.Layer]] = []
        if cfg.dvae_logits_norm == "center":
            head.append(("norm", CenterNorm(n_in)))
        if cfg.dvae_logits_norm == "instance":
            # NOT DALL-E (off by default). Each channel is normalised over the image's positions, so a
            # shift that is the same at every position, which Adam's first, sign-like updates of the
            # 7x7 stem (fan-in 3 p^2 x 49, inputs all in [0.1, 0.9]) add within a few steps, cannot
            # make one code the argmax everywhere. Without it, or with a per-position LayerNorm,
            # the shapes-world run collapses to 1-2 codes within 20 updates (docs/tokenizers.md).
            head.append(("norm", nn.GroupNorm(n_in, n_in)))
        conv = DalleConv(n_in, cfg.codebook_size, 1)
        if cfg.dvae_logits_init_scale != 1.0:  # not DALL-E: confident enough argmax from step 0
            conv.w.set_value(conv.w * cfg.dvae_logits_init_scale)
        head += [("relu", nn.ReLU()), ("conv", conv)]
        items.append(("output", nn.Sequential(*head)))
        self.blocks = nn.Sequential(*items)

    def forward(self, x01: Tensor) -> Tensor:
        """Mapped pixels [B, 3, H, W] in [eps, 1 - eps] -> logits [B, K, H/f, W/f]."""
        if self.patch_size > 1:
            x01 = F.pixel_unshuffle(x01, self.patch_size)
        return self.blocks(x01)

    def head_features(self, x01: Tensor) -> Tensor:
        """The input of the logits conv [B, C, H/f, W/f] (after the head's norm and relu)."""
        h = F.pixel_unshuffle(x01, self.patch_size) if self.patch_size > 1 else x01
        for name, layer in self.blocks.named_children():
            if name != "output":
                h = layer(h)
        for name, layer in self.blocks.output.named_children():
            if name != "conv":
                h = layer(h)
        return h


class DVAEDecoder(nn.Layer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths = level_channels(cfg)[::-1]  # coarsest (widest) group first
        n_layers = len(widths) * cfg.num_res_blocks
        self.patch_size = cfg.patch_size
        items: list[tuple[str, nn.Layer]] = [("input", DalleConv(cfg.codebook_size, cfg.embed_dim, 1))]
        n_in = cfg.embed_dim
        for g, width in enumerate(widths):
            group: list[tuple[str, nn.Layer]] = []
            for i in range(cfg.num_res_blocks):
                group.append((f"block_{i + 1}", _Block(n_in, width, n_layers, (1, 3, 3, 3))))
                n_in = width
            if g < len(widths) - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            items.append((f"group_{g + 1}", nn.Sequential(*group)))
        out_ch = 2 * cfg.in_channels * cfg.patch_size ** 2
        items.append(("output", nn.Sequential(("relu", nn.ReLU()), ("conv", DalleConv(n_in, out_ch, 1)))))
        self.blocks = nn.Sequential(*items)

    def forward_from_embeddings(self, z: Tensor) -> Tensor:
        """z [B, embed_dim, h, w] (after the input conv) -> stats [B, 6, H, W] (mu, log b)."""
        h = z
        for name, layer in self.blocks.named_children():
            if name != "input":
                h = layer(h)
        if self.patch_size > 1:  # [B, 2 * 3p^2, H/p, W/p]: mu channels first, then log b
            mu, log_b = paddle.split(h, 2, axis=1)
            h = paddle.concat([F.pixel_shuffle(mu, self.patch_size), F.pixel_shuffle(log_b, self.patch_size)], axis=1)
        return h

    def forward(self, one_hot: Tensor) -> Tensor:
        """(Relaxed) one-hot codes [B, K, h, w] -> stats [B, 6, H, W] (DALL-E's decoder call)."""
        return self.forward_from_embeddings(self.blocks.input(one_hot))


@dataclass
class DVAEOutput:
    logits: Tensor  # [B, K, h, w] encoder logits
    stats: Tensor  # [B, 6, H, W] decoder output: mu (logit space), log b
    recon: Tensor  # [B, 3, H, W] image in [-1, 1] (sigmoid(mu) unmapped)
    ids: Tensor  # [B, h, w] argmax ids


class DVAE(ImageTokenizer):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        if cfg.kind != "dvae":
            raise ConfigError(f"VQ.kind: DVAE builds 'dvae', got {cfg.kind!r}")
        if cfg.in_channels != 3:
            raise ConfigError(f"VQ.in_channels: the tokenizer interface is for RGB images, got {cfg.in_channels}")
        self.cfg = cfg
        self.encoder = DVAEEncoder(cfg)
        self.decoder = DVAEDecoder(cfg)

    @staticmethod
    def stats_to_image(stats: Tensor) -> Tensor:
        """Decoder stats -> image in [-1, 1]: DALL-E's unmap_pixels(sigmoid(mu))."""
        return unmap_pixels(F.sigmoid(stats[:, :3])) * 2.0 - 1.0

    def encoder_logits(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> logits [B, K, h, w]."""
        return self.encoder(map_pixels((images + 1.0) * 0.5))

    def forward(self, images: Tensor, temperature: float = 1.0, hard: bool = False,
                freeze_encoder: bool = False) -> DVAEOutput:
        logits = self.encoder_logits(images)
        if freeze_encoder:  # NOT DALL-E (DVAE.encoder_freeze_steps): the decoder learns the codes first
            # zero, not absent, gradients: Adam then keeps (zero) moments for the encoder, so a
            # checkpoint saved inside the freeze resumes (Paddle refuses a state without them)
            logits = logits.detach() + 0.0 * logits
        stats = self.decoder(relaxed_one_hot(logits, temperature, hard))
        return DVAEOutput(logits=logits, stats=stats, recon=self.stats_to_image(stats),
                          ids=paddle.argmax(logits, axis=1))

    def embed_ids(self, ids: Tensor) -> Tensor:
        """ids [B, h, w] -> z_emb [B, embed_dim, h, w]: the decoder's input conv on one-hot ids."""
        conv = self.decoder.blocks.input
        codebook = conv.w.reshape([conv.w.shape[0], conv.w.shape[1]]).transpose([1, 0])  # [K, d]
        z = F.embedding(ids, codebook) + conv.b  # [B, h, w, d]
        return z.transpose([0, 3, 1, 2])

    def decode_embeddings(self, z_emb: Tensor) -> Tensor:
        return self.stats_to_image(self.decoder.forward_from_embeddings(z_emb))

    def _encode_ids(self, images: Tensor) -> Tensor:
        return paddle.argmax(self.encoder_logits(images), axis=1)

    def _decode_ids(self, ids: Tensor) -> Tensor:
        return self.decode_embeddings(self.embed_ids(ids))

    def get_last_layer(self) -> Tensor:
        return self.decoder.blocks.output.conv.w


def build_dvae(vq_cfg: VQConfig) -> ImageTokenizer:
    """Registry entry for VQ.kind == "dvae"."""
    return DVAE(vq_cfg)
