"""The DALL-E discrete VAE's training loss and its training aids (the `dvae` stage uses them).

    loss = recon_nll + kl_weight(step) * KL(q(z|x) || uniform) / (3 f^2)

recon_nll is the mean over pixel values of the logit-Laplace negative log-likelihood (DALL-E):

    x' = map_pixels(x) in [eps, 1 - eps],  y = logit(x'),  decoder gives mu, log b per value
    -log p(x'|mu, b) = log(2 b) + log(x'(1 - x')) + |y - mu| / b

or (DVAE.recon_loss = mse) the mean squared error of the decoded image in [-1, 1], taken before
unmap_pixels' clip (a clipped pixel has no gradient), or (bce, `sigmoid_cross_entropy`) the
cross-entropy of x' against sigmoid(mu), which unlike MSE does not saturate. The KL is the
mean over token positions; dividing it by the 3 f^2 pixel values each token covers puts both
terms on the per-pixel-value scale, i.e. it is DALL-E's summed ELB divided by the number of pixel
values, so DALL-E's beta = 6.6 keeps its meaning. The temperature is cosine-annealed
temp_start -> temp_end over temp_anneal_steps and the KL weight ramps kl_weight_start ->
kl_weight_end over kl_warmup_steps (DALL-E: 1 -> 1/16 over 150k updates, 0 -> 6.6 over 5k).

NOT DALL-E options (off by default; config.DVAEConfig): k-means init of the logits conv and codebook
(`kmeans_init_logits`, fresh runs only), an encoder freeze for the first steps and an encoder lr
multiplier, and dead-code splits (`plan_code_splits`). docs/tokenizers.md, "dVAE", says why.
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.config import ConfigError, DVAEConfig
from ernie_vilg.vq.dvae import DVAE, DVAEOutput, kl_to_uniform, map_pixels

RECON_LOSSES = ("logit_laplace", "mse", "bce")


def logit_laplace_nll(images: paddle.Tensor, stats: paddle.Tensor, eps: float) -> paddle.Tensor:
    """Mean NLL of images [B, 3, H, W] in [-1, 1] under the decoder's stats [B, 6, H, W]."""
    x = map_pixels((images + 1.0) * 0.5, eps)  # in [eps, 1 - eps]
    y = paddle.log(x) - paddle.log(1.0 - x)  # logit(x)
    mu, log_b = stats[:, :3], stats[:, 3:]
    nll = log_b + math.log(2.0) + paddle.log(x * (1.0 - x)) + paddle.abs(y - mu) * paddle.exp(-log_b)
    return nll.mean()


def sigmoid_cross_entropy(images: paddle.Tensor, stats: paddle.Tensor, eps: float) -> paddle.Tensor:
    """NOT DALL-E (DVAE.recon_loss = bce): mean cross-entropy of the mapped pixel values
    x' in [eps, 1 - eps] against sigmoid(mu), minus its minimum (the entropy of x'), so 0 = exact.

    Mean-seeking like MSE (minimum at sigmoid(mu) = x'), but its gradient in mu is
    sigmoid(mu) - x', which does not vanish where the sigmoid saturates: with MSE on sigmoid(mu)
    the shapes-world decoder overshoots to mu ~ -40 within 20 updates (painting the black
    background), after which object pixels get ~no gradient and stay black (sat at 14.6 dB)."""
    x = map_pixels((images + 1.0) * 0.5, eps)
    mu = stats[:, :3]
    ce = F.binary_cross_entropy_with_logits(mu, x, reduction="none")
    ent = -(x * paddle.log(x) + (1.0 - x) * paddle.log(1.0 - x))
    return (ce - ent).mean()


class DVAELoss(nn.Layer):
    def __init__(self, cfg: DVAEConfig, downsample_factor: int) -> None:
        super().__init__()
        if cfg.recon_loss not in RECON_LOSSES:
            raise ConfigError(f"DVAE.recon_loss: one of {RECON_LOSSES}, got {cfg.recon_loss!r}")
        self.cfg = cfg
        self.values_per_token = 3 * downsample_factor ** 2

    def forward(self, images: paddle.Tensor, out: DVAEOutput, kl_weight: float) -> tuple[paddle.Tensor, dict[str, float]]:
        if self.cfg.recon_loss == "logit_laplace":
            rec = logit_laplace_nll(images, out.stats, self.cfg.logit_laplace_eps)
        elif self.cfg.recon_loss == "bce":
            rec = sigmoid_cross_entropy(images, out.stats, self.cfg.logit_laplace_eps)
        else:
            # on the decoder's image BEFORE unmap_pixels' clip to [0, 1]: black (0) pixels map to
            # sigmoid(mu) = eps, and with the clip every pixel the decoder paints darker than that
            # gets no gradient, so objects painted as background early on stay background (the
            # clipped loss sat at the all-black image for 150 steps in the shapes world)
            unclipped = (F.sigmoid(out.stats[:, :3]) - self.cfg.logit_laplace_eps) / (1.0 - 2.0 * self.cfg.logit_laplace_eps)
            rec = F.mse_loss(unclipped * 2.0 - 1.0, images)
        kl = kl_to_uniform(out.logits)
        loss = rec + kl_weight * kl / self.values_per_token
        logs = {"rec_loss": float(rec), "kl": float(kl), "mse": float(F.mse_loss(out.recon.detach(), images))}
        return loss, logs


def plan_code_splits(model: DVAE, images: paddle.Tensor, out: DVAEOutput, dead: np.ndarray,
                     rng: np.random.Generator, max_splits: int = 16) -> list:
    """NOT DALL-E (DVAE.dead_code_steps > 0): pick, for each dead code k, a used code j to split.

    A token position p is drawn with probability proportional to its reconstruction error (so
    object tokens, not the background, get the new codes); j = ids[p] and f_p is the logits conv's
    input there. Returns [(k, j, f_p, centre of j's features)] (none for a p whose features are
    j's centre, e.g. the all-same background); `apply_code_splits` changes the weights (at the start of
    the next step: doing it before this step's backward would change tensors its graph holds)."""
    k_dead = np.flatnonzero(dead)
    if k_dead.size == 0:
        return []
    if k_dead.size > max_splits:  # a few at a time: hundreds of codes die together early on
        k_dead = rng.choice(k_dead, size=max_splits, replace=False)
    with paddle.no_grad():
        err = ((out.recon - images) ** 2).mean(axis=1, keepdim=True)
        err = F.avg_pool2d(err, model.downsample_factor).flatten().numpy().astype("float64") + 1e-12
        feats = model.encoder.head_features(map_pixels((images + 1.0) * 0.5))  # [B, C, h, w]
        feats = feats.transpose([0, 2, 3, 1]).reshape([-1, feats.shape[1]]).numpy()
    ids = out.ids.flatten().numpy()
    pos = rng.choice(ids.size, size=k_dead.size, replace=ids.size < k_dead.size, p=err / err.sum())
    splits = []
    for k, p in zip(k_dead, pos):
        j = int(ids[p])
        centre = feats[ids == j].mean(axis=0)  # j's region in this batch
        if float(((feats[p] - centre) ** 2).sum()) > 1e-6:  # p is not j's typical (e.g. background) token
            splits.append((int(k), j, feats[p], centre))
    return splits


def apply_code_splits(model: DVAE, splits: list, margin: float = 1.0) -> None:
    """Code k gets j's logits row and bias plus a linear term that is +margin/2 at f_p, -margin/2 at
    the centre c of j's region and 0 half way (d = f_p - c: logit_k - logit_j = margin d.(f - m) /
    |d|^2, m = (f_p + c) / 2), so k takes the part of j's region on f_p's side; and j's codebook
    column, so the decoded image does not jump. The two then diverge under training. (A split
    along f_p itself does not work: the features after the ReLU are non-negative, so k would beat
    j nearly everywhere and simply replace it; the first shapes-world try lost codes that way.)"""
    if not splits:
        return
    head, emb = model.encoder.blocks.output.conv, model.decoder.blocks.input
    w, b, cb = head.w.numpy(), head.b.numpy(), emb.w.numpy()  # [K, C, 1, 1], [K], [d, K, 1, 1]
    for k, j, fp, centre in splits:
        d = fp - centre
        scale = margin / float(d @ d)
        w[k, :, 0, 0] = w[j, :, 0, 0] + scale * d
        b[k] = b[j] - scale * float(d @ (fp + centre)) / 2.0
        cb[:, k] = cb[:, j]
    head.w.set_value(w)
    head.b.set_value(b)
    emb.w.set_value(cb)


def _kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding, then `iters` Lloyd steps; an emptied cluster is re-seeded at the point
    farthest from its centre. x [N, C] float64 -> centroids [k, C]."""
    n = x.shape[0]
    sq = (x * x).sum(axis=1)
    cent = np.empty((k, x.shape[1]))
    cent[0] = x[rng.integers(n)]
    d2 = ((x - cent[0]) ** 2).sum(axis=1)
    for i in range(1, k):  # k-means++: rare patches (few objects of one colour) get centroids too
        total = d2.sum()
        j = rng.choice(n, p=d2 / total) if total > 1e-12 else rng.integers(n)
        cent[i] = x[j]
        d2 = np.minimum(d2, ((x - cent[i]) ** 2).sum(axis=1))
    for _ in range(iters):
        dist = sq[:, None] - 2.0 * x @ cent.T + (cent * cent).sum(axis=1)[None]
        assign = dist.argmin(axis=1)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(cent)
        np.add.at(sums, assign, x)
        nonempty = counts > 0
        cent[nonempty] = sums[nonempty] / counts[nonempty, None]
        for c in np.flatnonzero(~nonempty):
            far = int(dist[np.arange(n), assign].argmax())
            cent[c] = x[far]
            assign[far] = c
            dist[far, c] = 0.0
    return cent


def kmeans_init_logits(model: DVAE, batches: list, iters: int = 10, seed: int = 0,
                       logit_std: float = 0.0, init_codebook: bool = True) -> np.ndarray:
    """NOT DALL-E (DVAE.kmeans_init_batches > 0): data-dependent init of the logits conv, the
    k-means codebook init of VQ models applied to the dVAE's head.

    Why: with a random head, object tokens of every colour land on a few "blob" codes, the decoder
    can only paint their mean colour, and the straight-through gradient never separates colours
    (H(colour | code) 2.0-2.8 of 2.8 bits in the shapes world). A random encoder's features are
    nearly linear in the patch pixels, so k-means centroids of them separate colours from step 0.

    The head's input features f (after its norm and relu) of `batches` (images in [-1, 1]) are
    clustered into K = codebook_size centroids c_k, and the conv is set to
        logit_k(f) = s (c_k . f - |c_k|^2 / 2) = -s |f - c_k|^2 / 2 + (terms equal for all k),
    so argmax = the nearest centroid. s makes the logits' spread (mean over the batches' positions
    of the std over codes) `logit_std`, or (0) the random init's. A large spread (shapes world: 20)
    keeps gumbel noise (std 1.28) from replacing the nearest code by a far one and keeps the
    straight-through softmax, and so the encoder's gradient, on the few nearest codes.
    With init_codebook, code k's embedding (the decoder's input conv column) is c_k projected on
    the centroids' first embed_dim principal axes (unit std), so codes with similar features start
    with similar embeddings and the decoder learns one smooth map, not K unrelated columns.
    Returns the centroids [K, C]."""
    head = model.encoder.blocks.output.conv
    feats, spread = [], []
    with paddle.no_grad():
        for images in batches:
            f = model.encoder.head_features(map_pixels((images + 1.0) * 0.5))  # [B, C, h, w]
            spread.append(float(F.conv2d(f, head.w, head.b).std(axis=1).mean()))
            feats.append(f.transpose([0, 2, 3, 1]).reshape([-1, f.shape[1]]).numpy().astype("float64"))
    x = np.concatenate(feats)
    cent = _kmeans(x, model.codebook_size, iters, np.random.default_rng(seed))
    w = cent
    b = -0.5 * (cent * cent).sum(axis=1)
    raw_std = float((x @ w.T + b).std(axis=1, ddof=1).mean())  # ddof 1 as paddle.std
    s = (logit_std if logit_std > 0 else float(np.mean(spread))) / max(raw_std, 1e-12)
    head.w.set_value((s * w).reshape(head.w.shape).astype("float32"))
    head.b.set_value((s * b).astype("float32"))
    if init_codebook:
        emb = model.decoder.blocks.input  # w [d, K, 1, 1]: column k = code k's embedding
        d = emb.w.shape[0]
        centred = cent - cent.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)  # principal axes of the centroids
        proj = centred @ vt[:d].T  # [K, min(d, C)]
        proj = proj / max(float(proj.std()), 1e-12)
        cb = np.zeros((d, model.codebook_size))
        cb[: proj.shape[1]] = proj.T
        emb.w.set_value(cb.reshape(emb.w.shape).astype("float32"))
    return cent
