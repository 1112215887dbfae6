"""Every attention mask and sparse pattern of ERNIE-ViLG, in one place.

Canonical form: a bool array, True = the query (row) may attend to the key (column). It is turned
into an additive float mask once, by `to_additive`, with a finite fill value that is safe in fp16
(`ModelConfig.mask_fill_value`, -1e4 in the shipped configs; -inf would give NaN rows in fp16
kernels and `finfo.min` overflows when added to a score).

Streams (paper sec. 3.1.2). `L` = text length (padded to `max_text_len`), `n = h * w` image tokens:

    text-to-image  [t_1..t_L, z_1..z_n]   source = text,  target = image
    image-to-text  [z_1..z_n, t_1..t_L]   source = image, target = text

UniLM / ERNIE-GEN rule: source tokens see every source token (and no target token); target
tokens see every source token and the targets to their left (and themselves). Padding tokens
are ordinary tokens here (they are visible as source tokens and excluded from the loss), so every
mask is static: one per (direction, layer kind), never one per sample.

Sparse patterns over image tokens (DALL-E schedule, layer index i counted from 0):

    row     i mod 4 != 2     the image token sees the image tokens of its row
    column  i mod 4 == 2     ... of its column
    conv    the last layer   ... of the k x k window centred on it (no wrap-around at borders)

When the image is the target (text-to-image) the neighbourhood is cut to the raster-order past
(including the token itself); when the image is the source (image-to-text) it is bidirectional
(paper Fig. 2b). Text sees all text in text-to-image; text as target sees all image tokens and
the text to its left. `dense` keeps only the UniLM rule (image target: causal over all image
tokens; image source: all image tokens).

Text prefix (generative VQA, paper sec. 4.4). In image-to-text, a per-sample prefix of P text
positions (`[CLS] question [SEP]`) may join the source: prefix tokens see every image token and
every prefix token (bidirectional among themselves), answer tokens see the image, the whole
prefix and the answers to their left. By default image tokens keep their pattern and never see
text, so the image part of every layer is the same as in captioning; only the [L, L] text block
changes, to `causal | key < P`. P = 0 (or 1: only [CLS]) is exactly captioning.
`StreamLayout.image_sees_prefix` (`Model.image_sees_prefix`) applies UniLM's source rule to the
image too: image tokens also see the P question positions (besides their sparse image pattern), so
the image is read with the question in mind from the first layer on (early fusion; the question
still sees the whole image either way). With P <= 1 it is again captioning. Because the prefix rule keeps
the source in the top-left corner of the mask (a prefix token never sees a position >= n + P),
image + question are encoded in one pass before the answer is decoded, and a decoding step sees
every earlier position, as in captioning (`visible_keys` is unchanged).

The block-wise implementation (`attention.py`) uses the small pieces below (`causal_square`,
`conv_neighbours`) and never builds the (L + n)^2 mask; `stream_mask` builds that full mask for
the reference implementation and for tests. `visible_keys` lists the keys of one query for
incremental decoding.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

import numpy as np
import paddle

from ernie_vilg.config import ATTENTION_IMPLS


class Direction(str, Enum):
    TXT2IMG = "txt2img"
    IMG2TXT = "img2txt"

    @property
    def index(self) -> int:
        """Row of the direction embedding (0 = text-to-image, 1 = image-to-text)."""
        return 0 if self is Direction.TXT2IMG else 1


class LayerKind(str, Enum):
    DENSE = "dense"  # only the UniLM rule (attention_impl = "dense")
    ROW = "row"
    COLUMN = "column"
    CONV = "conv"




def layer_kinds(num_layers: int, attention_impl: str) -> list[LayerKind]:
    """The pattern of each layer: DALL-E's schedule, or DENSE everywhere for `attention_impl=dense`."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"Model.attention_impl: unknown {attention_impl!r} (known: {', '.join(ATTENTION_IMPLS)})")
    if attention_impl == "dense":
        return [LayerKind.DENSE] * num_layers
    kinds = [LayerKind.COLUMN if i % 4 == 2 else LayerKind.ROW for i in range(num_layers)]
    kinds[-1] = LayerKind.CONV
    return kinds


@dataclass(frozen=True)
class StreamLayout:
    """Where text and image tokens sit in one input stream."""

    direction: Direction
    text_len: int  # L: text positions (padded length)
    grid_h: int
    grid_w: int
    conv_kernel: int = 11  # k of the conv layer (odd)
    # image-to-text with a text prefix only: image tokens also see the prefix (source) positions
    image_sees_prefix: bool = False

    def __post_init__(self) -> None:
        if self.conv_kernel % 2 != 1:
            raise ValueError(f"conv kernel must be odd, got {self.conv_kernel}")

    @property
    def num_image(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def total(self) -> int:
        return self.text_len + self.num_image

    @property
    def text_start(self) -> int:
        return 0 if self.direction is Direction.TXT2IMG else self.num_image

    @property
    def image_start(self) -> int:
        return self.text_len if self.direction is Direction.TXT2IMG else 0

    @property
    def source_len(self) -> int:
        return self.text_len if self.direction is Direction.TXT2IMG else self.num_image

    @property
    def image_is_target(self) -> bool:
        return self.direction is Direction.TXT2IMG


@dataclass(frozen=True)
class PairedLayout:
    """Both directions of one batch stacked on the batch axis, for one pass through the blocks:
    rows [0, B) are the text-to-image streams, rows [B, 2B) the image-to-text streams, both with
    the same text length (so the same total length). Layers fuse every projection over the 2B
    rows; only the attention core treats the halves by their own layout."""

    txt2img: StreamLayout
    img2txt: StreamLayout

    def __post_init__(self) -> None:
        if (self.txt2img.direction is not Direction.TXT2IMG or self.img2txt.direction is not Direction.IMG2TXT
                or self.txt2img.total != self.img2txt.total):
            raise ValueError(f"a paired layout needs a text-to-image and an image-to-text stream of one "
                             f"length, got {self.txt2img} and {self.img2txt}")

    @property
    def total(self) -> int:
        return self.txt2img.total

    @property
    def halves(self) -> tuple[StreamLayout, StreamLayout]:
        return (self.txt2img, self.img2txt)


# --------------------------------------------------------------------------------------------
# Small pieces (used by the block-wise implementation and by the builders below)
# --------------------------------------------------------------------------------------------
def causal_square(size: int) -> np.ndarray:
    """bool [size, size], True on and below the diagonal: a row/column attends to its past."""
    return np.tril(np.ones((size, size), dtype=bool))


@functools.lru_cache(maxsize=64)
def conv_neighbours(grid_h: int, grid_w: int, kernel: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k x k window of every image token, as a gather table.

    Returns `index` int64 [n, k*k] (raster index of each neighbour; out-of-grid neighbours point
    to the dummy index n) and `valid` bool [n, k*k] (inside the grid and, if causal, not after
    the query in raster order). Window slots are ordered by (dr, dc) in raster order.
    """
    r = kernel // 2
    dr, dc = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
    dr, dc = dr.reshape(-1), dc.reshape(-1)  # [k*k]
    rows, cols = np.divmod(np.arange(grid_h * grid_w), grid_w)  # [n]
    nr, nc = rows[:, None] + dr[None, :], cols[:, None] + dc[None, :]  # [n, k*k]
    inside = (nr >= 0) & (nr < grid_h) & (nc >= 0) & (nc < grid_w)
    valid = inside & ((dr < 0) | ((dr == 0) & (dc <= 0)))[None, :] if causal else inside
    index = np.where(inside, nr * grid_w + nc, grid_h * grid_w).astype(np.int64)
    return index, valid


def conv_halo_tiles(grid_h: int, grid_w: int, kernel: int, causal: bool, tile: int = 8
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The conv pattern as tiles of queries that share one key set: the tile plus its halo.

    Queries are grouped into `tile` x `tile` squares; every query of a square sees at most the
    keys of the square grown by r = kernel // 2 on each side, so one [(tile + 2r)^2] key set per
    square replaces a k*k gather per query (far less memory when the head dim is large).

    Returns, with T squares, S = tile^2 query slots and K = (tile + 2r)^2 key slots per square:
      `halo_index` int64 [T * K]: raster index of each key slot (out-of-grid slots -> dummy n),
      `slot_query` int64 [T * S]: raster index of each query slot (slots past the grid -> n),
      `query_slot` int64 [n]: the slot of each raster query,
      `valid` bool [n, K]: key slot inside the grid, inside the query's k x k window and, if
      causal, not after the query in raster order (the same pattern as `conv_neighbours`).
    """
    r = kernel // 2
    t = max(1, min(tile, max(grid_h, grid_w)))
    th, tw = -(-grid_h // t), -(-grid_w // t)
    side = t + 2 * r
    n = grid_h * grid_w
    ti, tj = np.divmod(np.arange(th * tw), tw)  # [T] square coordinates
    a, b = np.divmod(np.arange(side * side), side)  # [K] key slot offsets inside the halo
    kr = (ti * t - r)[:, None] + a[None, :]  # [T, K] key rows
    kc = (tj * t - r)[:, None] + b[None, :]
    k_inside = (kr >= 0) & (kr < grid_h) & (kc >= 0) & (kc < grid_w)
    halo_index = np.where(k_inside, kr * grid_w + kc, n).astype(np.int64)
    qa, qb = np.divmod(np.arange(t * t), t)  # [S] query slot offsets inside a square
    qr = (ti * t)[:, None] + qa[None, :]  # [T, S]
    qc = (tj * t)[:, None] + qb[None, :]
    q_inside = (qr < grid_h) & (qc < grid_w)
    slot_query = np.where(q_inside, qr * grid_w + qc, n).astype(np.int64).reshape(-1)
    query_slot = np.zeros(n, dtype=np.int64)
    query_slot[slot_query[slot_query < n]] = np.nonzero(slot_query < n)[0]
    rows, cols = np.divmod(np.arange(n), grid_w)  # [n] raster queries
    square = (rows // t) * tw + cols // t
    dr = kr[square] - rows[:, None]  # [n, K] key offset from the query
    dc = kc[square] - cols[:, None]
    valid = k_inside[square] & (np.abs(dr) <= r) & (np.abs(dc) <= r)
    if causal:
        valid &= (dr < 0) | ((dr == 0) & (dc <= 0))
    return halo_index, slot_query, query_slot, valid


def prefix_text_square(size: int, prefix: int) -> np.ndarray:
    """bool [size, size] text block of image-to-text: causal, plus every row sees keys < prefix."""
    if prefix < 0:
        raise ValueError(f"text prefix must be >= 0, got {prefix}")
    return causal_square(size) | (np.arange(size) < prefix)[None, :]


def image_pattern(kind: LayerKind, grid_h: int, grid_w: int, kernel: int, causal: bool) -> np.ndarray:
    """bool [n, n]: which image tokens an image token sees in a layer of this kind."""
    n = grid_h * grid_w
    rows, cols = np.divmod(np.arange(n), grid_w)
    if kind is LayerKind.DENSE:
        allowed = np.ones((n, n), dtype=bool)
    elif kind is LayerKind.ROW:
        allowed = rows[:, None] == rows[None, :]
    elif kind is LayerKind.COLUMN:
        allowed = cols[:, None] == cols[None, :]
    elif kind is LayerKind.CONV:
        index, valid = conv_neighbours(grid_h, grid_w, kernel, causal)
        allowed = np.zeros((n, n + 1), dtype=bool)
        np.put_along_axis(allowed, index, valid, axis=1)  # invalid slots only write False
        return allowed[:, :n]
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    if causal:
        allowed &= causal_square(n)
    return allowed


# --------------------------------------------------------------------------------------------
# Full masks (reference implementation, tests)
# --------------------------------------------------------------------------------------------
def stream_mask(layout: StreamLayout, kind: LayerKind, text_prefix: int = 0) -> np.ndarray:
    """bool [L + n, L + n] over the whole stream, True = may attend.

    `text_prefix` (image-to-text only): the first P text positions are source (see the module doc).
    """
    L, n = layout.text_len, layout.num_image
    if text_prefix and layout.direction is Direction.TXT2IMG:
        raise ValueError("a text prefix exists only in the image-to-text stream")
    img = image_pattern(kind, layout.grid_h, layout.grid_w, layout.conv_kernel, causal=layout.image_is_target)
    mask = np.zeros((layout.total, layout.total), dtype=bool)
    t, i = slice(layout.text_start, layout.text_start + L), slice(layout.image_start, layout.image_start + n)
    if layout.direction is Direction.TXT2IMG:
        mask[t, t] = True  # source text sees all text
        mask[i, t] = True  # target image sees all source text
        mask[i, i] = img
    else:
        mask[i, i] = img  # source image: bidirectional neighbourhood
        if layout.image_sees_prefix:  # ... and the question
            mask[i, t] = image_rows_prefix_keys(L, np.array([text_prefix]))[0]
        mask[t, i] = True  # target text sees every image token
        mask[t, t] = prefix_text_square(L, text_prefix)
    return mask


def image_rows_prefix_keys(text_len: int, text_prefix: np.ndarray) -> np.ndarray:
    """bool [B, text_len]: the text keys every image query of sample b sees under
    `image_sees_prefix`: the first text_prefix[b] positions, none when the prefix is only [CLS]
    (P <= 1 stays captioning)."""
    prefix = np.asarray(text_prefix, dtype=np.int64).reshape(-1, 1)
    return np.arange(text_len)[None, :] < np.where(prefix > 1, prefix, 0)


def text_rows_mask(num_image: int, text_len: int, text_prefix: np.ndarray | None = None) -> np.ndarray:
    """Keys of the text queries of image-to-text, over [image (n), text (text_len)]: bool
    [text_len, n + text_len] without a prefix (captioning), else [B, text_len, n + text_len] with
    sample b's first `text_prefix[b]` text positions as source."""
    if text_prefix is None:
        return np.concatenate([np.ones((text_len, num_image), dtype=bool), causal_square(text_len)], axis=1)
    prefix = np.asarray(text_prefix, dtype=np.int64).reshape(-1, 1, 1)  # [B, 1, 1]
    text = causal_square(text_len)[None] | (np.arange(text_len)[None, None, :] < prefix)  # [B, Lt, Lt]
    image = np.ones((len(prefix), text_len, num_image), dtype=bool)
    return np.concatenate([image, text], axis=2)


@functools.lru_cache(maxsize=1024)
def _cached_stream_mask(layout: StreamLayout, kind: LayerKind, text_prefix: int) -> np.ndarray:
    return stream_mask(layout, kind, text_prefix)


def batch_stream_masks(layout: StreamLayout, kind: LayerKind, text_prefix: np.ndarray) -> np.ndarray:
    """bool [B, L + n, L + n]: the stream mask of every sample, with its own text prefix."""
    return np.stack([_cached_stream_mask(layout, kind, int(p)) for p in np.asarray(text_prefix).reshape(-1)])


def to_additive(mask: np.ndarray, fill_value: float, dtype: str | paddle.dtype = "float32") -> paddle.Tensor:
    """bool mask (True = attend) -> additive float mask (0 where allowed, `fill_value` elsewhere)."""
    additive = np.where(mask, 0.0, fill_value).astype("float32")
    return paddle.to_tensor(additive).astype(dtype)


# --------------------------------------------------------------------------------------------
# Incremental decoding: the keys of one query
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=65536)
def visible_keys(layout: StreamLayout, kind: LayerKind, query: int) -> np.ndarray:
    """Stream positions (ascending, int64) that the target token at `query` attends to.

    Costs O(number of visible keys): a row layer lists the text and the current row only.
    """
    if query < layout.source_len:
        raise ValueError(f"position {query} is a source token; source tokens are encoded in one pass")
    L = layout.text_len
    if layout.direction is Direction.IMG2TXT:
        return np.arange(query + 1, dtype=np.int64)  # every image token + text to the left
    p = query - L  # raster index of the image query
    r, c = divmod(p, layout.grid_w)
    w = layout.grid_w
    if kind is LayerKind.DENSE:
        img = np.arange(p + 1)
    elif kind is LayerKind.ROW:
        img = np.arange(r * w, p + 1)
    elif kind is LayerKind.COLUMN:
        img = np.arange(c, p + 1, w)
    elif kind is LayerKind.CONV:
        index, valid = conv_neighbours(layout.grid_h, w, layout.conv_kernel, True)
        img = np.sort(index[p][valid[p]])
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    return np.concatenate([np.arange(L), L + img]).astype(np.int64)


def mean_visible_keys(layout: StreamLayout, kind: LayerKind) -> float:
    """Average number of keys a token attends to (for FLOP estimates), without the full mask."""
    L, n, h, w = layout.text_len, layout.num_image, layout.grid_h, layout.grid_w
    causal = layout.image_is_target
    if kind is LayerKind.DENSE:
        img = (n + 1) / 2 if causal else n
    elif kind is LayerKind.ROW:
        img = (w + 1) / 2 if causal else w
    elif kind is LayerKind.COLUMN:
        img = (h + 1) / 2 if causal else h
    else:
        _, valid = conv_neighbours(h, w, layout.conv_kernel, causal)
        img = float(valid.sum(axis=1).mean())
    if layout.direction is Direction.TXT2IMG:
        total = L * L + n * (L + img)  # text sees text; image sees text + its pattern
    else:
        total = n * img + L * n + L * (L + 1) / 2
    return total / layout.total
