"""Training loss of the VQVAE tokenizer (ERNIE-ViLG Eq. 1).

    L_VQVAE = ||x - x_hat||^2 + ||sg[z_emb] - E(x)||^2 + ||sg[E(x)] - z_emb||^2

The quantizer already returns its two terms (with the configured commitment weight beta) as
`quant_loss`; this layer adds the reconstruction MSE and builds the log dict. The model never
imports it, so VQGAN can bring its own loss (perceptual + patch GAN) against the same model API.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.vq.vqvae import VQVAEOutput


class VQVAELoss(nn.Layer):
    def forward(self, images: paddle.Tensor, out: VQVAEOutput) -> tuple[paddle.Tensor, dict[str, float]]:
        """images [B, 3, H, W] in [-1, 1] and the model output -> (scalar loss, float logs)."""
        rec_loss = F.mse_loss(out.recon, images)
        loss = rec_loss + out.quant_loss
        logs = {
            "rec_loss": float(rec_loss),
            "quant_loss": float(out.quant_loss),
            "perplexity": float(out.info.perplexity),
            "codes_used": float(out.info.codes_used),
        }
        return loss, logs
