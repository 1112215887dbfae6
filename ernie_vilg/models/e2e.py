"""End-to-end text-to-image (ERNIE-ViLG sec. 3.1.3, Fig. 1 green path): generator + reconstructor.

    h      = last-layer hidden states of the image tokens z_1..z_n       [B, n, d_model]
             (the stream positions L .. L+n-1 whose inputs are the image tokens, so each state
             has seen the text, z_1..z_k, and z_k itself)
    z_emb  = MLP(h) reshaped to the token grid                            [B, d_z, h, w]
    x_hat  = R(z_emb), R = a decoder with the image tokenizer's architecture
             (`ImageTokenizer.decode_embeddings` of a copy of the tokenizer, optionally
             initialised from the trained one)
    loss   = gen_weight * NLL(text->image) + i2t_weight * NLL(image->text)
             + rec_weight * ||x_hat - x||                                  (equal weights: 1, 1)

Gradients of the reconstruction loss flow through the MLP into the whole transformer.
Training feeds the gold (teacher-forced) sequence; at inference the sampled sequence is fed once
more to get its hidden states. `reconstruct_from_ids` takes any id sequence, so the end-to-end
reconstructor can decode gold or generated tokens, and the two-stage decoder
(`tokenizer.decode_ids`) can decode either too: every row of the paper's Table 7.

The model is `ErnieViLGE2E`, a subclass of `ErnieViLG` that adds the `e2e` sublayer; everything
of the bidirectional model (forward, prefill / step decoding) is inherited unchanged. Hidden
states and logits come from one pass through the model's public pieces (`hidden_states`, then
`head_img` on the predicting positions), which is what `forward` computes internally.
"""
from __future__ import annotations

import copy
from typing import Any

import paddle
import paddle.nn as nn

from ernie_vilg.config import ConfigError, E2EConfig, ModelConfig
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG
from ernie_vilg.vq.registry import build_tokenizer

Tensor = paddle.Tensor
REC_LOSSES = ("mse", "l1")


def embedding_dim(tokenizer: Any) -> int:
    """Channels of the tokenizer's z_emb (probe one id: no per-kind attribute needed)."""
    with paddle.no_grad():
        return int(tokenizer.embed_ids(paddle.zeros([1, 1, 1], dtype="int64")).shape[1])


class Reconstructor(nn.Layer):
    """MLP from hidden states to z_emb + a decoder with the tokenizer's architecture."""

    def __init__(self, hidden_size: int, mlp_hidden: int, tokenizer: Any, init_from_tokenizer: bool, grid: int) -> None:
        super().__init__()
        z_dim = embedding_dim(tokenizer)
        self.grid = grid
        self.mapping = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, z_dim))
        # a trainable copy of the whole tokenizer; only its decode_embeddings path is used (the
        # encoder / codebook of the copy receive no gradient and stay as initialised)
        decoder = copy.deepcopy(tokenizer) if init_from_tokenizer else build_tokenizer(tokenizer.cfg)
        decoder.train()
        for p in decoder.parameters():
            p.stop_gradient = False
        self.decoder = decoder

    def forward(self, h_img: Tensor) -> Tensor:
        """h_img [B, n, d] -> image [B, 3, H, W] (raw decoder output)."""
        b, n, _ = h_img.shape
        z = self.mapping(h_img)  # [B, n, d_z]
        z = z.reshape([b, self.grid, self.grid, -1]).transpose([0, 3, 1, 2])  # -> [B, d_z, h, w]
        return self.decoder.decode_embeddings(z)


class ErnieViLGE2E(ErnieViLG):
    """The bidirectional generator plus the end-to-end reconstructor (`self.e2e`)."""

    def __init__(self, cfg: ModelConfig, tokenizer: Any, e2e: E2EConfig, recompute: str = "none",
                 recompute_every_k: int = 1) -> None:
        super().__init__(cfg, recompute=recompute, recompute_every_k=recompute_every_k)
        if e2e.rec_loss not in REC_LOSSES:
            raise ConfigError(f"E2E.rec_loss: one of {REC_LOSSES}, got {e2e.rec_loss!r}")
        self.e2e_cfg = e2e
        self.e2e = Reconstructor(cfg.hidden_size, e2e.mlp_hidden or cfg.hidden_size, tokenizer,
                                 e2e.init_from_tokenizer, cfg.image_grid)

    def txt2img_with_hidden(self, text_ids: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(image logits [B, n, V] aligned with image_ids, image-token hidden states [B, n, d])."""
        h = self.hidden_states(text_ids, image_ids, Direction.TXT2IMG)  # [B, L + n, d]
        L, n = text_ids.shape[1], self.cfg.image_grid ** 2
        _, h_pred, _ = paddle.split(h, [L - 1, n, 1], axis=1)  # positions L-1 .. L+n-2 predict z
        _, h_img = paddle.split(h, [L, n], axis=1)  # positions L .. L+n-1 hold z_1 .. z_n
        return self.head_img(h_pred), h_img

    def reconstruct_from_ids(self, text_ids: Tensor, image_ids: Tensor) -> Tensor:
        """The end-to-end reconstructor's image [B, 3, H, W] in [-1, 1] for any id sequence
        (gold or generated): one teacher-forced pass to get its hidden states."""
        _, h_img = self.txt2img_with_hidden(text_ids, image_ids)
        return paddle.clip(self.e2e(h_img), -1.0, 1.0)

    def reconstruction_loss(self, recon: Tensor, images: Tensor) -> Tensor:
        diff = recon - images
        return (diff * diff).mean() if self.e2e_cfg.rec_loss == "mse" else diff.abs().mean()
