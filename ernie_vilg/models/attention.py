"""Self-attention over an ERNIE-ViLG stream, with three interchangeable cores (`Model.attention_impl`).

    dense              UniLM mask only (no sparsity), as a precomputed additive (L+n)^2 mask
    sparse_reference   the layer's sparse pattern as a precomputed additive (L+n)^2 mask
    sparse_blockwise   the same pattern computed block by block: image tokens are reshaped into
                       rows / columns (batched matmuls over w x w or h x h blocks) or gathered into
                       k x k windows (conv); text rows attend densely to what they may see. The full
                       (L+n)^2 mask and score matrix are never built.

Which keys each query may see is defined only in `sparse_masks.py`. All cores share the
projections, so one set of weights runs under any core (tests check blockwise == reference).

A layer is called on a prefix of the stream: either the whole stream (training, uncached
decoding) or the source segment only (the source never sees the target, so it can be encoded in
one pass before incremental decoding). `step` attends one new target token to the cache.

`text_prefix` (int64 [B], image-to-text only; None = captioning) makes the first P_b text
positions of sample b source (generative VQA: `[CLS] question [SEP]`); the source segment is then
image + question, n + P positions (every sample of a decoding batch has the same P). The text
query rows change (`sparse_masks.text_rows_mask`); image rows keep their pattern and, only with
`layout.image_sees_prefix`, also see the question keys (`sparse_masks.image_rows_prefix_keys`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.models.fast_ops import Linear
from ernie_vilg.models.sparse_masks import (
    Direction,
    LayerKind,
    PairedLayout,
    StreamLayout,
    batch_stream_masks,
    causal_square,
    conv_halo_tiles,
    image_rows_prefix_keys,
    stream_mask,
    text_rows_mask,
    to_additive,
    visible_keys,
)

if TYPE_CHECKING:  # the cache lives with the decoding loops; the model only reads/writes it
    from ernie_vilg.models.kv_cache import LayerKV

Tensor = paddle.Tensor
# decoding steps of streams up to this many positions score the whole cache under a mask instead of
# gathering the visible keys (measured faster at the quickstart's sizes: docs/benchmarks.md,
# "Generation speed"); longer streams (the paper's 1,088) gather, so a step's cost follows its pattern
MASKED_STEP_MAX_KEYS = 512


def _masked_softmax_attend(q: Tensor, k: Tensor, v: Tensor, additive: Tensor | None) -> Tensor:
    """q [B,H,Tq,D] (already scaled), k/v [B,H,Tk,D], additive [Tq,Tk] or None -> [B,H,Tq,D]."""
    scores = paddle.matmul(q, k, transpose_y=True)  # [B, H, Tq, Tk]
    if additive is not None:
        scores = scores + additive
    return paddle.matmul(F.softmax(scores, axis=-1), v)


class _Neighbourhood:
    """Scores of image queries against their row / column / window keys, and the weighted sum.

    `scores(q)` -> [B, H, n, K]; `attend(probs [B, H, n, K])` -> [B, H, n, D]; `additive` [n, K]
    (or a broadcastable block shape) masks keys the query may not see, None if none.
    """

    def __init__(self, kind: LayerKind, layout: StreamLayout, k_img: Tensor, v_img: Tensor,
                 causal: bool, fill_value: float) -> None:
        self.kind, self.h, self.w = kind, layout.grid_h, layout.grid_w
        B, H, n, D = k_img.shape
        self.shape = (B, H, n, D)
        dtype = k_img.dtype
        if kind is LayerKind.ROW:
            # [B, H, n, D] -> [B, H, h, w, D]: one w x w block per row
            self.k = k_img.reshape([B, H, self.h, self.w, D])
            self.v = v_img.reshape([B, H, self.h, self.w, D])
            self.additive = to_additive(causal_square(self.w), fill_value, dtype) if causal else None
        elif kind is LayerKind.COLUMN:
            # [B, H, n, D] -> [B, H, h, w, D] -> [B, H, w, h, D]: one h x h block per column
            self.k = k_img.reshape([B, H, self.h, self.w, D]).transpose([0, 1, 3, 2, 4])
            self.v = v_img.reshape([B, H, self.h, self.w, D]).transpose([0, 1, 3, 2, 4])
            self.additive = to_additive(causal_square(self.h), fill_value, dtype) if causal else None
        elif kind is LayerKind.CONV:
            halo, slot_query, query_slot, valid = conv_halo_tiles(self.h, self.w, layout.conv_kernel, causal)
            self.halo = halo.size // valid.shape[1]  # T squares
            self.slots = slot_query.size // self.halo  # S query slots per square
            kk = valid.shape[1]  # K key slots per square
            self.slot_query = paddle.to_tensor(slot_query)
            self.query_slot = paddle.to_tensor(query_slot)
            flat = paddle.to_tensor(halo.reshape(-1))  # [T * K]; index n = the zero pad row
            pad = paddle.zeros([B, H, 1, D], dtype)
            # [B, H, n + 1, D] -> gather [B, H, T*K, D] -> [B, H, T, K, D]: one key set per square
            self.k = paddle.index_select(paddle.concat([k_img, pad], axis=2), flat, axis=2).reshape(
                [B, H, self.halo, kk, D])
            self.v = paddle.index_select(paddle.concat([v_img, pad], axis=2), flat, axis=2).reshape(
                [B, H, self.halo, kk, D])
            self.additive = to_additive(valid, fill_value, dtype)  # [n, K]
        else:
            raise ValueError(f"block-wise attention has no {kind!r} layers")

    def scores(self, q_img: Tensor) -> Tensor:
        B, H, n, D = self.shape
        if self.kind is LayerKind.ROW:
            q = q_img.reshape([B, H, self.h, self.w, D])
            s = paddle.matmul(q, self.k, transpose_y=True)  # [B, H, h, w, w]
            if self.additive is not None:
                s = s + self.additive
            return s.reshape([B, H, n, self.w])  # [B, H, h*w, w]
        if self.kind is LayerKind.COLUMN:
            q = q_img.reshape([B, H, self.h, self.w, D]).transpose([0, 1, 3, 2, 4])  # [B, H, w, h, D]
            s = paddle.matmul(q, self.k, transpose_y=True)  # [B, H, w, h, h]
            if self.additive is not None:
                s = s + self.additive
            # [B, H, w, h, h] -> [B, H, h, w, h] -> [B, H, n, h]: back to raster order of queries
            return s.transpose([0, 1, 3, 2, 4]).reshape([B, H, n, self.h])
        # conv: raster queries -> square slots [B, H, T, S, D] (slots past the grid read a zero row)
        q = paddle.index_select(paddle.concat([q_img, paddle.zeros([B, H, 1, D], q_img.dtype)], axis=2),
                                self.slot_query, axis=2).reshape([B, H, self.halo, self.slots, D])
        s = paddle.matmul(q, self.k, transpose_y=True)  # [B, H, T, S, K]
        s = s.reshape([B, H, self.halo * self.slots, s.shape[-1]])  # [B, H, T*S, K]
        return paddle.index_select(s, self.query_slot, axis=2) + self.additive  # [B, H, n, K]

    def attend(self, probs: Tensor) -> Tensor:
        B, H, n, D = self.shape
        if self.kind is LayerKind.ROW:
            p = probs.reshape([B, H, self.h, self.w, self.w])
            return paddle.matmul(p, self.v).reshape([B, H, n, D])  # [B, H, h, w, D] -> [B, H, n, D]
        if self.kind is LayerKind.COLUMN:
            # [B, H, n, h] -> [B, H, h, w, h] -> [B, H, w, h, h]
            p = probs.reshape([B, H, self.h, self.w, self.h]).transpose([0, 1, 3, 2, 4])
            out = paddle.matmul(p, self.v)  # [B, H, w, h, D]
            return out.transpose([0, 1, 3, 2, 4]).reshape([B, H, n, D])  # -> [B, H, h, w, D] -> [B, H, n, D]
        # conv: [B, H, n, K] -> square slots [B, H, T, S, K] @ [B, H, T, K, D] -> [B, H, T, S, D]
        K = probs.shape[-1]
        p = paddle.index_select(paddle.concat([probs, paddle.zeros([B, H, 1, K], probs.dtype)], axis=2),
                                self.slot_query, axis=2).reshape([B, H, self.halo, self.slots, K])
        out = paddle.matmul(p, self.v).reshape([B, H, self.halo * self.slots, D])  # [B, H, T*S, D]
        return paddle.index_select(out, self.query_slot, axis=2)  # back to raster order [B, H, n, D]


def check_positions(T: int, layout: StreamLayout, text_prefix: np.ndarray | None) -> None:
    """A layer runs on the source, the whole stream or (with a text prefix) image + a text prefix."""
    if T in (layout.source_len, layout.total):
        return
    if text_prefix is not None and layout.direction is Direction.IMG2TXT and layout.num_image < T < layout.total:
        return
    raise ValueError(f"attention runs on the source ({layout.source_len}) or the whole stream "
                     f"({layout.total}) positions, got {T}")


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, layout: StreamLayout, kind: LayerKind,
                        fill_value: float, text_prefix: np.ndarray | None = None) -> Tensor:
    """Sparse attention over a stream prefix (source only, or the whole stream), block by block.

    q is already scaled; q/k/v [B, H, T, D] with T = layout.source_len or layout.total (or, with
    `text_prefix` [B], image + the first T - n text positions).
    """
    T, L, n = q.shape[2], layout.text_len, layout.num_image
    check_positions(T, layout, text_prefix)
    if text_prefix is not None and layout.direction is Direction.TXT2IMG:
        raise ValueError("a text prefix exists only in the image-to-text stream")
    outs = []
    # split (not slice): the backward of a split is one concat, a slice's is a zero-filled copy each
    parts = [L, n] if layout.direction is Direction.TXT2IMG else [n, T - n]
    if T > layout.source_len:
        (q_a, q_b), (k_a, k_b), (v_a, v_b) = (paddle.split(t, parts, axis=2) for t in (q, k, v))
    else:
        q_a, k_a, v_a = q, k, v
    if layout.direction is Direction.TXT2IMG:
        q_t, k_t, v_t = q_a, k_a, v_a
        outs.append(_masked_softmax_attend(q_t, k_t, v_t, None))  # text sees all text
        if T == layout.total:
            q_i, k_i, v_i = q_b, k_b, v_b
            nb = _Neighbourhood(kind, layout, k_i, v_i, causal=True, fill_value=fill_value)
            s_text = paddle.matmul(q_i, k_t, transpose_y=True)  # [B, H, n, L]: every text key
            probs = F.softmax(paddle.concat([s_text, nb.scores(q_i)], axis=-1), axis=-1)  # [B, H, n, L + K]
            p_text, p_img = paddle.split(probs, [L, probs.shape[-1] - L], axis=-1)
            outs.append(paddle.matmul(p_text, v_t) + nb.attend(p_img))
    else:
        q_i, k_i, v_i = q_a, k_a, v_a
        nb = _Neighbourhood(kind, layout, k_i, v_i, causal=False, fill_value=fill_value)
        seen = None
        if layout.image_sees_prefix and text_prefix is not None and T > n:
            seen = image_rows_prefix_keys(T - n, text_prefix)  # [B, T - n]
            width = int(seen.sum(axis=1).max())  # keys past the longest prefix are never seen
        if seen is None or width == 0:
            outs.append(nb.attend(F.softmax(nb.scores(q_i), axis=-1)))  # image: bidirectional, no text
        else:  # image: its neighbourhood + the question keys, one softmax (as text-to-image's image rows)
            k_q, v_q = k_b[:, :, :width], v_b[:, :, :width]
            additive = to_additive(seen[:, :width], fill_value, q.dtype).reshape([-1, 1, 1, width])
            s_text = paddle.matmul(q_i, k_q, transpose_y=True) + additive  # [B, H, n, width]
            probs = F.softmax(paddle.concat([s_text, nb.scores(q_i)], axis=-1), axis=-1)
            p_text, p_img = paddle.split(probs, [width, probs.shape[-1] - width], axis=-1)
            outs.append(paddle.matmul(p_text, v_q) + nb.attend(p_img))
        if T > n:
            # text rows: every image key + causal text (+ the prefix); the mask is only
            # [Lt, n + Lt], or [B, 1, Lt, n + Lt] with a per-sample prefix
            additive = to_additive(text_rows_mask(n, T - n, text_prefix), fill_value, q.dtype)
            if text_prefix is not None:
                additive = additive.unsqueeze(1)
            outs.append(_masked_softmax_attend(q_b, k, v, additive))
    return paddle.concat(outs, axis=2) if len(outs) > 1 else outs[0]


class SelfAttention(nn.Layer):
    """Multi-head self-attention of one layer; `kind` is its sparse pattern, `impl` the core."""

    def __init__(self, hidden_size: int, num_heads: int, kind: LayerKind, impl: str, conv_kernel: int,
                 mask_fill_value: float, dropout: float, init_std: float, proj_std: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.kind, self.impl, self.conv_kernel = kind, impl, conv_kernel
        self.fill_value = mask_fill_value
        normal = nn.initializer.Normal(std=init_std)
        self.qkv = Linear(hidden_size, 3 * hidden_size, weight_attr=paddle.ParamAttr(initializer=normal))
        self.proj = Linear(hidden_size, hidden_size,
                              weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(std=proj_std)))
        self.dropout = nn.Dropout(dropout)
        # additive (L+n)^2 masks of the dense cores, built once per layout
        self._mask_cache: dict[StreamLayout, Tensor] = {}
        self._step_masks: dict[tuple[StreamLayout, int], Tensor] = {}  # incremental decoding, per position

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        # [B, T, 3d] -> [B, T, 3, H, D] -> [3, B, H, T, D]
        qkv = self.qkv(x).reshape([B, T, 3, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])
        q, k, v = paddle.unbind(qkv, axis=0)  # 3 x [B, H, T, D]
        return q * (1.0 / math.sqrt(self.head_dim)), k, v

    def _merge(self, out: Tensor) -> Tensor:
        B, H, T, D = out.shape
        # [B, H, T, D] -> [B, T, H, D] -> [B, T, H*D]
        return self.dropout(self.proj(out.transpose([0, 2, 1, 3]).reshape([B, T, H * D])))

    def _cached_mask(self, layout: StreamLayout, build: Any) -> Tensor:
        """The additive mask of `layout`, built once per layout in eager mode. While a graph is
        traced (paddle.jit.to_static, tools/export.py) a built tensor belongs to that graph's
        program, so it is never kept: a second graph with the same layout would use a value of
        another program."""
        mask = self._mask_cache.get(layout)
        if mask is None:
            mask = build()
            if paddle.in_dynamic_mode():
                self._mask_cache[layout] = mask
        return mask

    def _full_mask(self, layout: StreamLayout, dtype: paddle.dtype) -> Tensor:
        return self._cached_mask(layout, lambda: to_additive(stream_mask(layout, self.kind), self.fill_value)
                                 ).astype(dtype)

    def forward(self, x: Tensor, layout: StreamLayout, cache: LayerKV | None = None,
                text_prefix: np.ndarray | None = None) -> Tensor:
        """x [B, T, d] for stream positions [0, T) (T = source or whole stream) -> [B, T, d].

        With a cache, the keys / values of these positions are written into it (prefill).
        `text_prefix` int64 [B]: source text positions per sample (image-to-text; None = none).
        """
        T = x.shape[1]
        q, k, v = self._heads(x)
        if isinstance(layout, PairedLayout):
            return self._merge(self._paired_core(q, k, v, layout))
        if self.impl == "sparse_blockwise":
            out = blockwise_attention(q, k, v, layout, self.kind, self.fill_value, text_prefix)
        else:
            check_positions(T, layout, text_prefix)
            # the source block of the stream mask is its top-left corner (the source comes first)
            if text_prefix is None:
                additive = self._full_mask(layout, q.dtype)[:T, :T]
            else:  # one (L + n)^2 mask per sample: [B, T, T] -> [B, 1, T, T] (broadcast over heads)
                masks = batch_stream_masks(layout, self.kind, text_prefix)[:, :T, :T]
                additive = to_additive(masks, self.fill_value, q.dtype).unsqueeze(1)
            out = _masked_softmax_attend(q, k, v, additive)
        if cache is not None:
            cache.write(0, k, v)
        return self._merge(out)

    def _paired_core(self, q: Tensor, k: Tensor, v: Tensor, layout: PairedLayout) -> Tensor:
        """Both directions' streams in one batch (rows [0, B) text-to-image, [B, 2B) image-to-text).

        The dense-mask cores score all 2B rows in one matmul and add each half's mask by
        broadcasting ([2B, H, T, T] viewed as [2, B, H, T, T] + [2, 1, 1, T, T]); the block-wise
        core runs on each half with its own layout. Same maths as one call per direction."""
        if self.impl == "sparse_blockwise":
            halves = [paddle.split(t, 2, axis=0) for t in (q, k, v)]
            outs = [blockwise_attention(halves[0][i], halves[1][i], halves[2][i], half, self.kind, self.fill_value)
                    for i, half in enumerate(layout.halves)]
            return paddle.concat(outs, axis=0)
        B2, H, T, _ = q.shape
        def build() -> Tensor:
            masks = np.stack([stream_mask(half, self.kind) for half in layout.halves])  # [2, T, T]
            return to_additive(masks, self.fill_value).reshape([2, 1, 1, T, T])

        additive = self._cached_mask(layout, build).astype(q.dtype)
        scores = paddle.matmul(q, k, transpose_y=True).reshape([2, B2 // 2, H, T, T]) + additive
        probs = F.softmax(scores, axis=-1).reshape([B2, H, T, T])
        return paddle.matmul(probs, v)

    def _step_mask(self, layout: StreamLayout, position: int) -> Tensor:
        """Additive [1, T]: 0 on the keys the target token at `position` sees, fill elsewhere."""
        key = (layout, position)
        if key not in self._step_masks:
            seen = np.zeros((1, layout.total), dtype=bool)
            seen[0, visible_keys(layout, self.kind, position)] = True
            self._step_masks[key] = to_additive(seen, self.fill_value)
        return self._step_masks[key]

    def step(self, x: Tensor, layout: StreamLayout, position: int, cache: LayerKV) -> Tensor:
        """One new target token at stream `position`: x [B, 1, d] -> [B, 1, d].

        Reads only the keys the pattern allows (e.g. text + the current row in a row layer), so
        the cost does not grow with the whole sequence where the pattern does not need it.
        """
        q, k, v = self._heads(x)  # [B, H, 1, D]
        cache.write(position, k, v)
        if layout.total <= MASKED_STEP_MAX_KEYS:
            # short streams: score the whole cache (unwritten positions hold zeros) and mask what this
            # position may not see; a matmul over T keys is cheaper here than gathering the K visible
            # ones (the gather copies [B, H, K, D] every step: 48 % of image sampling at 8 x 8 tokens)
            return self._merge(_masked_softmax_attend(q, cache.key, cache.value, self._step_mask(layout, position)))
        idx = paddle.to_tensor(visible_keys(layout, self.kind, position))  # [K]
        keys = paddle.index_select(cache.key, idx, axis=2)  # [B, H, K, D]
        values = paddle.index_select(cache.value, idx, axis=2)
        return self._merge(_masked_softmax_attend(q, keys, values, None))

