"""Nearest-codebook vector quantizer (ERNIE-ViLG sec. 3.1.1, Eq. 1-2).

    z_emb = C(q(E(x)))                       nearest codebook entry of each encoder vector
    L_q   = ||sg[E(x)] - z_emb||^2           codebook term (omitted when the codebook is an EMA)
          + beta * ||sg[z_emb] - E(x)||^2    commitment term (Eq. 1 has beta = 1; set it in YAML)

Squared norms are averaged over all elements (not summed), so the quantizer loss is on the same
scale as the per-pixel reconstruction MSE it is added to.

Gradients pass the non-differentiable lookup "straight through": the decoder's gradient w.r.t.
z_q is copied unchanged onto E(x).

Options (all from `VQConfig`, none hidden):
  * `use_ema`: the codebook is not a parameter but an exponential moving average of the encoder
    vectors assigned to each code (cluster sizes with Laplace smoothing + embedding sums).
  * `dead_code_steps`: a code unused for that many training steps is re-initialised from a random
    encoder output of the current batch (keeps codebook usage high).
  * `l2_normalize`: encoder vectors and codes are unit-normalised before the lookup, so the
    nearest code is the one with the highest cosine similarity.

State updates (EMA, dead-code restarts, usage statistics) happen only in `forward` while the layer
is in training mode; `lookup_ids` / `embed_ids` are pure functions of the weights, which is what a
frozen tokenizer uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.config import ConfigError

# Upper bound on elements of one [rows, K] distance block (16M floats = 64 MB): the lookup is
# chunked over rows so that e.g. 32x32 tokens x batch 64 x codebook 8192 never materialises 0.5 G.
_MAX_DISTANCE_ELEMENTS = 1 << 24
# decay of the across-steps code-usage average that is reported as `avg_perplexity`
_USAGE_AVG_DECAY = 0.99
_EPS = 1e-5


@dataclass
class QuantizerInfo:
    """Code-usage statistics of one batch (0-d float32 tensors, detached)."""

    perplexity: paddle.Tensor  # exp(entropy of the batch's code histogram); 1 .. codebook_size
    codes_used: paddle.Tensor  # fraction of the codebook used at least once in the batch


@dataclass
class QuantizerOutput:
    z_q: paddle.Tensor  # [B, d, h, w] quantized vectors with straight-through gradient to E(x)
    loss: paddle.Tensor  # scalar: codebook term (non-EMA) + beta * commitment term
    ids: paddle.Tensor  # [B, h, w] int64 code indices
    info: QuantizerInfo


def _perplexity(counts: paddle.Tensor) -> paddle.Tensor:
    probs = counts / paddle.clip(counts.sum(), min=1e-12)
    return paddle.exp(-(probs * paddle.log(probs + 1e-10)).sum())


class VectorQuantizer(nn.Layer):
    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        beta: float,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        dead_code_steps: int = 0,
        l2_normalize: bool = False,
    ) -> None:
        super().__init__()
        if codebook_size < 2 or embed_dim < 1:
            raise ConfigError(f"VQ: codebook_size ({codebook_size}) must be >= 2 and embed_dim ({embed_dim}) >= 1")
        if use_ema and not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"VQ.ema_decay: must be in (0, 1), got {ema_decay}")
        if beta < 0 or dead_code_steps < 0:
            raise ConfigError(f"VQ: beta ({beta}) and dead_code_steps ({dead_code_steps}) must be >= 0")
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.use_ema = use_ema
        self.ema_decay = ema_decay
        self.dead_code_steps = dead_code_steps
        self.l2_normalize = l2_normalize

        # uniform(-1/K, 1/K) as in the VQ-VAE reference; dead-code restarts fix the bad start
        init = paddle.uniform([codebook_size, embed_dim], min=-1.0 / codebook_size, max=1.0 / codebook_size)
        if use_ema:
            # not trained by the optimizer: a buffer rewritten from the EMA statistics each step
            self.register_buffer("codebook", init)
            self.register_buffer("ema_cluster_size", paddle.zeros([codebook_size]))
            self.register_buffer("ema_embed_sum", init.clone())
        else:
            self.codebook = self.create_parameter(
                [codebook_size, embed_dim], default_initializer=nn.initializer.Assign(init)
            )
        # training steps since each code was last chosen (saved, so restarts survive a resume)
        self.register_buffer("steps_since_used", paddle.zeros([codebook_size], dtype="int64"))
        # running average of the code histogram, for logging usage across steps; starts at zero
        # and is read normalised, which removes the start-up bias of the average
        self.register_buffer("usage_avg", paddle.zeros([codebook_size]))

    # ---------------------------------------------------------------- pure lookups
    def _normalized_codebook(self) -> paddle.Tensor:
        return F.normalize(self.codebook, axis=1) if self.l2_normalize else self.codebook

    def _nearest(self, flat: paddle.Tensor) -> paddle.Tensor:
        """flat [N, d] -> ids [N] of the nearest code (Euclidean; cosine when l2-normalised)."""
        codes = self._normalized_codebook()
        codes_sq = (codes * codes).sum(axis=1)  # [K]
        rows = max(1, _MAX_DISTANCE_ELEMENTS // self.codebook_size)
        ids = []
        for start in range(0, flat.shape[0], rows):
            chunk = flat[start : start + rows]
            # ||z||^2 is constant per row and does not change the argmin: dist = ||e||^2 - 2 z.e
            dist = codes_sq.unsqueeze(0) - 2.0 * paddle.matmul(chunk, codes, transpose_y=True)  # [n, K]
            ids.append(paddle.argmin(dist, axis=1))
        return paddle.concat(ids) if len(ids) > 1 else ids[0]

    def _flatten(self, z: paddle.Tensor) -> paddle.Tensor:
        b, d, h, w = z.shape
        if d != self.embed_dim:
            raise ValueError(f"quantizer expects {self.embed_dim} channels, got {d}")
        flat = z.transpose([0, 2, 3, 1]).reshape([-1, d])  # [B, d, h, w] -> [B*h*w, d]
        return F.normalize(flat, axis=1) if self.l2_normalize else flat

    @paddle.no_grad()
    def lookup_ids(self, z: paddle.Tensor) -> paddle.Tensor:
        """Encoder output z [B, d, h, w] -> code ids [B, h, w] (no state change)."""
        b, _, h, w = z.shape
        return self._nearest(self._flatten(z)).reshape([b, h, w])

    def embed_ids(self, ids: paddle.Tensor) -> paddle.Tensor:
        """Code ids [B, h, w] -> z_emb [B, d, h, w] (the codebook lookup C(z) of Eq. 2)."""
        if ids.dtype not in (paddle.int64, paddle.int32):
            raise TypeError(f"ids must be int32/int64, got {ids.dtype}")
        b, h, w = ids.shape
        z = F.embedding(ids.reshape([-1]), self._normalized_codebook())  # [B*h*w, d]
        return z.reshape([b, h, w, self.embed_dim]).transpose([0, 3, 1, 2])  # -> [B, d, h, w]

    # ---------------------------------------------------------------- training forward
    def forward(self, z: paddle.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = self._flatten(z)  # [N, d]
        ids_flat = self._nearest(flat.detach())  # [N]
        z_emb = F.embedding(ids_flat, self._normalized_codebook())  # [N, d]

        commitment = F.mse_loss(flat, z_emb.detach())  # ||sg[z_emb] - E(x)||^2
        if self.use_ema:
            loss = self.beta * commitment
        else:
            codebook_term = F.mse_loss(z_emb, flat.detach())  # ||sg[E(x)] - z_emb||^2
            loss = codebook_term + self.beta * commitment

        # straight-through: forward value z_emb, gradient d/dz_q copied onto E(x)
        z_q_flat = flat + (z_emb - flat).detach()
        z_q = z_q_flat.reshape([b, h, w, d]).transpose([0, 3, 1, 2])  # [N, d] -> [B, d, h, w]

        counts = paddle.bincount(ids_flat, minlength=self.codebook_size).astype("float32")  # [K]
        if self.training:
            self._update_state(flat.detach(), ids_flat, counts)
        info = QuantizerInfo(
            perplexity=_perplexity(counts).detach(),
            codes_used=(counts > 0).astype("float32").mean().detach(),
        )
        return QuantizerOutput(z_q=z_q, loss=loss, ids=ids_flat.reshape([b, h, w]), info=info)

    # ---------------------------------------------------------------- state updates
    @paddle.no_grad()
    def _update_state(self, flat: paddle.Tensor, ids: paddle.Tensor, counts: paddle.Tensor) -> None:
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            # every rank must apply the same update so the codebooks stay identical
            dist.all_reduce(counts)
        if self.use_ema:
            embed_sum = paddle.zeros([self.codebook_size, self.embed_dim]).index_add(ids, 0, flat)  # [K, d]
            if distributed:
                dist.all_reduce(embed_sum)
            decay = self.ema_decay
            self.ema_cluster_size.set_value(decay * self.ema_cluster_size + (1 - decay) * counts)
            self.ema_embed_sum.set_value(decay * self.ema_embed_sum + (1 - decay) * embed_sum)
            # Laplace smoothing keeps never-assigned codes from dividing by zero
            n = self.ema_cluster_size.sum()
            size = (self.ema_cluster_size + _EPS) / (n + self.codebook_size * _EPS) * n
            self.codebook.set_value(self.ema_embed_sum / size.unsqueeze(1))

        probs = counts / paddle.clip(counts.sum(), min=1.0)
        self.usage_avg.set_value(_USAGE_AVG_DECAY * self.usage_avg + (1 - _USAGE_AVG_DECAY) * probs)
        used = counts > 0
        self.steps_since_used.set_value(
            paddle.where(used, paddle.zeros_like(self.steps_since_used), self.steps_since_used + 1)
        )
        if self.dead_code_steps > 0:
            self._restart_dead_codes(flat, distributed)

    @paddle.no_grad()
    def _restart_dead_codes(self, flat: paddle.Tensor, distributed: bool) -> None:
        dead = paddle.nonzero(self.steps_since_used >= self.dead_code_steps).flatten()  # [n_dead]
        n_dead = int(dead.shape[0])
        if n_dead == 0:
            return
        # random current encoder outputs (with replacement when the batch has fewer vectors)
        pick = paddle.randint(0, flat.shape[0], [n_dead])
        new = paddle.gather(flat, pick)  # [n_dead, d]
        if distributed:
            dist.broadcast(new, src=0)  # rank 0 chooses, everyone copies
        self.codebook.set_value(paddle.scatter(self.codebook, dead, new))
        if self.use_ema:
            # a restarted code starts as a cluster of one vector equal to itself
            self.ema_cluster_size.set_value(paddle.scatter(self.ema_cluster_size, dead, paddle.ones([n_dead])))
            self.ema_embed_sum.set_value(paddle.scatter(self.ema_embed_sum, dead, new))
        self.steps_since_used.set_value(
            paddle.scatter(self.steps_since_used, dead, paddle.zeros([n_dead], dtype="int64"))
        )

    # ---------------------------------------------------------------- logging
    def usage_stats(self) -> dict[str, float]:
        """Usage across training steps: perplexity of the running histogram average, and the
        fraction of codes chosen within the last `dead_code_steps` (or 100) steps."""
        window = self.dead_code_steps or 100
        return {
            "avg_perplexity": float(_perplexity(self.usage_avg)),
            "codes_alive": float((self.steps_since_used < window).astype("float32").mean()),
        }
