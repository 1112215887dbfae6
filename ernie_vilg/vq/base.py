"""The image tokenizer interface: the only view of stage 1 that stage 2 gets.

Every tokenizer (VQVAE, VQGAN, dVAE) maps images to a grid of code ids and back:

    encode_to_ids(images [B, 3, H, W] float32 in [-1, 1]) -> ids [B, h, w] int64, h = H / f
    decode_ids(ids [B, h, w])                             -> images [B, 3, H, W] in [-1, 1]
    embed_ids(ids [B, h, w])                              -> z_emb [B, d, h, w] (codebook lookup)
    decode_embeddings(z_emb [B, d, h, w])                 -> images (with gradients; end-to-end)
    codebook_size, grid_size(image_size)

`vq.registry.build_tokenizer` picks the class from `VQ.kind`; `load_tokenizer` rebuilds a trained
one from a checkpoint folder and freezes it. A frozen tokenizer runs in fp32 without gradients,
whatever AMP context the caller is in.
"""
from __future__ import annotations

import json
from pathlib import Path

import paddle
import paddle.nn as nn

from ernie_vilg.config import VQConfig


TOKENIZER_INFO_FILE = "tokenizer.json"  # the summary next to a tokenizer checkpoint's weights


class ImageTokenizer(nn.Layer):
    """Base class; subclasses set `self.cfg` (their VQConfig) and implement `_encode_ids`,
    `_decode_ids`, `embed_ids`, `decode_embeddings`."""

    cfg: VQConfig

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def grid_size(self, image_size: int) -> int:
        """Side of the token grid for square images of `image_size` pixels."""
        f = self.downsample_factor
        if image_size % f:
            raise ValueError(f"image size {image_size} is not divisible by the downsample factor {f}")
        return image_size // f

    def embed_ids(self, ids: paddle.Tensor) -> paddle.Tensor:
        """ids [B, h, w] -> z_emb [B, d, h, w]: the codebook lookup C(z) of Eq. 2."""
        raise NotImplementedError

    def decode_embeddings(self, z_emb: paddle.Tensor) -> paddle.Tensor:
        """z_emb [B, d, h, w] -> images [B, 3, H, W], differentiable (end-to-end reconstructor)."""
        raise NotImplementedError

    def _encode_ids(self, images: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    def _decode_ids(self, ids: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    @paddle.no_grad()
    def encode_to_ids(self, images: paddle.Tensor) -> paddle.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> ids [B, H/f, W/f] int64 (fp32, no grad)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {list(images.shape)}")
        self.grid_size(images.shape[2]), self.grid_size(images.shape[3])  # divisibility check
        # the tokenizer is always fp32: an outer auto_cast must not reach its convolutions
        with paddle.amp.auto_cast(enable=False):
            return self._encode_ids(images.astype("float32")).astype("int64")

    @paddle.no_grad()
    def decode_ids(self, ids: paddle.Tensor) -> paddle.Tensor:
        """ids [B, h, w] -> images [B, 3, h*f, w*f] clipped to [-1, 1] (fp32, no grad)."""
        if ids.ndim != 3:
            raise ValueError(f"expected ids [B, h, w], got shape {list(ids.shape)}")
        with paddle.amp.auto_cast(enable=False):
            return paddle.clip(self._decode_ids(ids.astype("int64")), -1.0, 1.0)

    def freeze(self) -> "ImageTokenizer":
        """Stage-1 weights are fixed for stage 2: eval mode and no gradients on any parameter."""
        self.eval()
        for param in self.parameters():
            param.stop_gradient = True
        return self


def write_tokenizer_info(tokenizer: ImageTokenizer, image_size: int, folder: str | Path) -> None:
    """`tokenizer.json`: kind, sizes and grid, so other stages read them without the network."""
    info = {"kind": tokenizer.cfg.kind, "codebook_size": tokenizer.codebook_size,
            "downsample_factor": tokenizer.downsample_factor, "image_size": image_size,
            "grid_size": tokenizer.grid_size(image_size)}
    (Path(folder) / TOKENIZER_INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
