"""The attention masks against the paper's Fig. 2 example (text length 6, 4x4 image, 3x3 kernel).

The expected patterns are written out by hand here (not derived from the code under test).
"""
from __future__ import annotations

import numpy as np
import pytest

from ernie_vilg.models.sparse_masks import (
    Direction,
    LayerKind,
    StreamLayout,
    layer_kinds,
    mean_visible_keys,
    stream_mask,
    to_additive,
    visible_keys,
)

L, H, W, K = 6, 4, 4, 3
N = H * W

# 3x3 window of each raster position of a 4x4 grid, cut to the raster past (text-to-image target)
CONV_CAUSAL = {
    0: [0], 1: [0, 1], 2: [1, 2], 3: [2, 3],
    4: [0, 1, 4], 5: [0, 1, 2, 4, 5], 6: [1, 2, 3, 5, 6], 7: [2, 3, 6, 7],
    8: [4, 5, 8], 9: [4, 5, 6, 8, 9], 10: [5, 6, 7, 9, 10], 11: [6, 7, 10, 11],
    12: [8, 9, 12], 13: [8, 9, 10, 12, 13], 14: [9, 10, 11, 13, 14], 15: [10, 11, 14, 15],
}
# ... and the whole window (image-to-text source, Fig. 2b)
CONV_BIDIR = {
    0: [0, 1, 4, 5], 1: [0, 1, 2, 4, 5, 6], 2: [1, 2, 3, 5, 6, 7], 3: [2, 3, 6, 7],
    4: [0, 1, 4, 5, 8, 9], 5: [0, 1, 2, 4, 5, 6, 8, 9, 10], 6: [1, 2, 3, 5, 6, 7, 9, 10, 11],
    7: [2, 3, 6, 7, 10, 11], 8: [4, 5, 8, 9, 12, 13], 9: [4, 5, 6, 8, 9, 10, 12, 13, 14],
    10: [5, 6, 7, 9, 10, 11, 13, 14, 15], 11: [6, 7, 10, 11, 14, 15], 12: [8, 9, 12, 13],
    13: [8, 9, 10, 12, 13, 14], 14: [9, 10, 11, 13, 14, 15], 15: [10, 11, 14, 15],
}


def hand_image_block(kind: LayerKind, causal: bool) -> np.ndarray:
    block = np.zeros((N, N), dtype=bool)
    for p in range(N):
        r, c = divmod(p, W)
        if kind is LayerKind.ROW:
            seen = [r * W + j for j in range(W)]
        elif kind is LayerKind.COLUMN:
            seen = [i * W + c for i in range(H)]
        elif kind is LayerKind.DENSE:
            seen = list(range(N))
        else:
            seen = (CONV_CAUSAL if causal else CONV_BIDIR)[p]
        for q in seen:
            if not causal or q <= p:
                block[p, q] = True
    return block


def hand_stream_mask(direction: Direction, kind: LayerKind) -> np.ndarray:
    mask = np.zeros((L + N, L + N), dtype=bool)
    if direction is Direction.TXT2IMG:  # [t_1..t_6, z_1..z_16]
        mask[:L, :L] = True
        mask[L:, :L] = True
        mask[L:, L:] = hand_image_block(kind, causal=True)
    else:  # [z_1..z_16, t_1..t_6]
        mask[:N, :N] = hand_image_block(kind, causal=False)
        mask[N:, :N] = True
        for j in range(L):
            mask[N + j, N:N + j + 1] = True
    return mask


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("kind", list(LayerKind))
def test_stream_mask_matches_figure_2_example(direction: Direction, kind: LayerKind) -> None:
    layout = StreamLayout(direction, L, H, W, K)
    np.testing.assert_array_equal(stream_mask(layout, kind), hand_stream_mask(direction, kind))


def test_source_never_sees_target_and_target_sees_whole_source() -> None:
    for direction in Direction:
        layout = StreamLayout(direction, L, H, W, K)
        S = layout.source_len
        for kind in LayerKind:
            mask = stream_mask(layout, kind)
            assert not mask[:S, S:].any()
            if direction is Direction.IMG2TXT or kind is LayerKind.DENSE:
                continue
            assert mask[S:, :S].all()  # image target sees all text


def test_layer_schedule_follows_dalle() -> None:
    kinds = layer_kinds(8, "sparse_blockwise")
    assert kinds == [LayerKind.ROW, LayerKind.ROW, LayerKind.COLUMN, LayerKind.ROW,
                     LayerKind.ROW, LayerKind.ROW, LayerKind.COLUMN, LayerKind.CONV]
    assert layer_kinds(3, "dense") == [LayerKind.DENSE] * 3
    with pytest.raises(ValueError, match="attention_impl"):
        layer_kinds(2, "flash")


def test_additive_mask_is_fp16_safe() -> None:
    mask = stream_mask(StreamLayout(Direction.TXT2IMG, L, H, W, K), LayerKind.ROW)
    add = to_additive(mask, -1e4, "float16").numpy()
    assert np.isfinite(add).all()
    assert set(np.unique(add)) == {0.0, np.float16(-1e4)}


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("kind", list(LayerKind))
def test_visible_keys_are_the_mask_rows(direction: Direction, kind: LayerKind) -> None:
    layout = StreamLayout(direction, 3, 3, 5, 3)
    mask = stream_mask(layout, kind)
    for q in range(layout.source_len, layout.total):
        np.testing.assert_array_equal(visible_keys(layout, kind, q), np.flatnonzero(mask[q]))
        if kind is LayerKind.ROW and direction is Direction.TXT2IMG:
            assert len(visible_keys(layout, kind, q)) <= layout.text_len + layout.grid_w


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("kind", list(LayerKind))
def test_mean_visible_keys_counts_the_mask(direction: Direction, kind: LayerKind) -> None:
    layout = StreamLayout(direction, 5, 4, 3, 3)
    assert mean_visible_keys(layout, kind) == pytest.approx(stream_mask(layout, kind).sum(1).mean())


@pytest.mark.parametrize("h,w,k,tile", [(4, 4, 3, 2), (6, 5, 5, 3), (32, 32, 11, 8), (7, 9, 3, 8)])
@pytest.mark.parametrize("causal", [True, False])
def test_conv_halo_tiles_cover_exactly_the_conv_window(h, w, k, tile, causal):
    from ernie_vilg.models.sparse_masks import conv_halo_tiles, conv_neighbours

    halo, slot_query, query_slot, valid = conv_halo_tiles(h, w, k, causal, tile)
    index, want_valid = conv_neighbours(h, w, k, causal)
    n = h * w
    keys_per_square = valid.shape[1]
    assert np.array_equal(slot_query[query_slot], np.arange(n))  # every query has one slot
    for q in range(n):
        square = query_slot[q] // (slot_query.size // (halo.size // keys_per_square))
        got = set(halo.reshape(-1, keys_per_square)[square][valid[q]].tolist())
        assert got == set(index[q][want_valid[q]].tolist()), q


# ------------------------------------------------------------------------------ VQA text prefix
@pytest.mark.parametrize("kind", list(LayerKind))
@pytest.mark.parametrize("prefix", [0, 1, 3, L])
def test_vqa_prefix_mask_written_by_hand(kind: LayerKind, prefix: int) -> None:
    """Fig. 2b layout with the first `prefix` text positions as source ([CLS] question [SEP])."""
    hand = hand_stream_mask(Direction.IMG2TXT, kind)
    for j in range(L):  # question rows see the whole question; answer rows the question + their past
        for i in range(L):
            hand[N + j, N + i] = i <= j or i < prefix
    layout = StreamLayout(Direction.IMG2TXT, L, H, W, K)
    np.testing.assert_array_equal(stream_mask(layout, kind, prefix), hand)


def test_vqa_prefix_rules() -> None:
    """Source (image + question) never sees the answer; the image never sees text; the answer sees
    every source token; prefix 0 and 1 are captioning."""
    layout = StreamLayout(Direction.IMG2TXT, L, H, W, K)
    caption = stream_mask(layout, LayerKind.ROW)
    for p in (0, 1):
        np.testing.assert_array_equal(stream_mask(layout, LayerKind.ROW, p), caption)
    P = 4
    mask = stream_mask(layout, LayerKind.ROW, P)
    src = N + P
    assert not mask[:src, src:].any()  # source -> target: nothing
    assert not mask[:N, N:].any()  # image -> text: nothing
    assert mask[N:src, :src].all()  # question -> image and whole question
    assert mask[src:, :src].all()  # answer -> every source token
    np.testing.assert_array_equal(mask[src:, src:], np.tril(np.ones((L - P, L - P), dtype=bool)))


def test_image_sees_prefix_opens_only_the_image_to_question_block() -> None:
    """`image_sees_prefix`: image rows also see the question (P > 1) and nothing else changes;
    the source still never sees the target; P <= 1 is captioning."""
    plain = StreamLayout(Direction.IMG2TXT, L, H, W, K)
    fused = StreamLayout(Direction.IMG2TXT, L, H, W, K, image_sees_prefix=True)
    for kind in LayerKind:
        for p in (0, 1):
            np.testing.assert_array_equal(stream_mask(fused, kind, p), stream_mask(plain, kind, p))
        P = 4
        a, b = stream_mask(plain, kind, P), stream_mask(fused, kind, P)
        assert b[:N, N:N + P].all() and not b[:N, N + P:].any()  # image -> question, never -> answer
        np.testing.assert_array_equal(b[:N, :N], a[:N, :N])  # the sparse image pattern is kept
        np.testing.assert_array_equal(b[N:], a[N:])  # text rows unchanged
        assert not b[:N + P, N + P:].any()  # source -> target: nothing
    np.testing.assert_array_equal(stream_mask(fused, LayerKind.ROW), stream_mask(plain, LayerKind.ROW))


def test_text_rows_and_batched_masks_agree_with_the_stream_mask() -> None:
    from ernie_vilg.models.sparse_masks import batch_stream_masks, text_rows_mask

    layout = StreamLayout(Direction.IMG2TXT, L, H, W, K)
    prefixes = np.array([0, 2, 5])
    rows = text_rows_mask(N, L, prefixes)
    batch = batch_stream_masks(layout, LayerKind.CONV, prefixes)
    for b, p in enumerate(prefixes):
        full = stream_mask(layout, LayerKind.CONV, int(p))
        np.testing.assert_array_equal(rows[b], full[N:])
        np.testing.assert_array_equal(batch[b], full)
    np.testing.assert_array_equal(text_rows_mask(N, L), stream_mask(layout, LayerKind.ROW)[N:])
    with pytest.raises(ValueError, match="image-to-text"):
        stream_mask(StreamLayout(Direction.TXT2IMG, L, H, W, K), LayerKind.ROW, 2)


@pytest.mark.parametrize("kind", list(LayerKind))
def test_visible_keys_of_answer_tokens_are_the_prefix_mask_rows(kind: LayerKind) -> None:
    """Decoding steps after a prefilled question read exactly the prefix mask's rows."""
    layout = StreamLayout(Direction.IMG2TXT, L, H, W, K)
    P = 3
    mask = stream_mask(layout, kind, P)
    for q in range(N + P, layout.total):
        np.testing.assert_array_equal(visible_keys(layout, kind, q), np.flatnonzero(mask[q]))
