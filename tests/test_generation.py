"""KV-cache decoding equals full re-computation; logit filters; beam search."""
from __future__ import annotations

import itertools

import numpy as np
import paddle
import pytest

from ernie_vilg.config import ModelConfig
from ernie_vilg.generation.decoding import (
    CachedStepper,
    FullStepper,
    SamplingParams,
    TextSpecials,
    beam_search_text_tokens,
    generate_image_tokens,
    generate_text_tokens,
)
from ernie_vilg.generation.filters import apply_temperature, log_softmax, sample, softmax, top_k_filter, top_p_filter
from ernie_vilg.models.sparse_masks import Direction, LayerKind
from ernie_vilg.models.transformer import ErnieViLG

SPECIALS = TextSpecials(bos_id=2, eos_id=3, pad_id=0)
L, G = 6, 4


def tiny_model(impl: str, text_vocab: int = 30, max_text_len: int = L, seed: int = 0) -> ErnieViLG:
    paddle.seed(seed)
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_heads=4, conv_kernel=3, text_vocab_size=text_vocab,
                      image_vocab_size=20, max_text_len=max_text_len, image_grid=G, init_std=0.3,
                      attention_impl=impl)
    model = ErnieViLG(cfg)
    model.eval()
    return model


IMPLS = ("dense", "sparse_reference", "sparse_blockwise")
rng = np.random.default_rng(0)
TEXT = rng.integers(5, 30, (3, L))
TEXT[:, 0] = 2
IMAGES = rng.integers(0, 20, (3, G, G))


# ------------------------------------------------------------------------------ cache vs no cache
@pytest.mark.parametrize("impl", IMPLS)
def test_cached_and_uncached_logits_match_text_to_image(impl: str) -> None:
    model = tiny_model(impl)
    cached, full = CachedStepper(model, Direction.TXT2IMG), FullStepper(model, Direction.TXT2IMG)
    a, b = cached.start(TEXT), full.start(TEXT)
    np.testing.assert_allclose(a, b, atol=1e-4)
    for tok in IMAGES.reshape(3, -1).T[:-1]:
        np.testing.assert_allclose(cached.step(tok), full.step(tok), atol=1e-4)
    assert cached.cache.length == cached.cache.layout.total - 1


@pytest.mark.parametrize("impl", IMPLS)
def test_cached_and_uncached_logits_match_image_to_text(impl: str) -> None:
    model = tiny_model(impl)
    cached, full = CachedStepper(model, Direction.IMG2TXT), FullStepper(model, Direction.IMG2TXT, pad_id=0)
    cached.start(IMAGES.reshape(3, -1))
    full.start(IMAGES.reshape(3, -1))
    for tok in TEXT.T[:-1]:
        np.testing.assert_allclose(cached.step(tok), full.step(tok), atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_decoding_is_identical_with_and_without_cache(impl: str) -> None:
    model = tiny_model(impl)
    greedy = SamplingParams(greedy=True)
    np.testing.assert_array_equal(generate_image_tokens(model, TEXT, greedy, use_cache=True),
                                  generate_image_tokens(model, TEXT, greedy, use_cache=False))
    assert (generate_text_tokens(model, IMAGES, SPECIALS, greedy, use_cache=True)
            == generate_text_tokens(model, IMAGES, SPECIALS, greedy, use_cache=False))


def test_sampling_is_seeded_batched_and_gives_candidates() -> None:
    model = tiny_model("sparse_blockwise")
    params = SamplingParams(greedy=False, temperature=1.0, top_k=5, top_p=0.9)
    a = generate_image_tokens(model, TEXT[:2], params, num_candidates=3, seed=7)
    b = generate_image_tokens(model, TEXT[:2], params, num_candidates=3, seed=7)
    c = generate_image_tokens(model, TEXT[:2], params, num_candidates=3, seed=8)
    assert a.shape == (6, G, G) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len({a[i].tobytes() for i in range(3)}) > 1  # candidates of one text differ


def test_incremental_step_reads_only_the_pattern_keys() -> None:
    """A row layer's step gathers text + the current row, not the whole prefix."""
    from ernie_vilg.models.sparse_masks import visible_keys

    model = tiny_model("sparse_blockwise")
    layout = model.layout(Direction.TXT2IMG)
    last = layout.total - 1
    assert model.kinds[0] is LayerKind.ROW and model.kinds[-1] is LayerKind.CONV
    assert len(visible_keys(layout, LayerKind.ROW, last)) == L + G
    assert len(visible_keys(layout, LayerKind.COLUMN, last)) == L + G
    assert len(visible_keys(layout, LayerKind.CONV, last)) == L + 4  # 3x3 causal window, bottom-right corner


# ------------------------------------------------------------------------------ filters
def test_top_k_keeps_the_k_largest() -> None:
    logits = np.array([[1.0, 5.0, 3.0, 2.0], [0.0, 0.0, 1.0, -1.0]])
    out = top_k_filter(logits, 2)
    assert np.isfinite(out).sum(1).tolist() == [2, 3]  # ties at the k-th value are kept
    assert np.isfinite(out[0]).tolist() == [False, True, True, False]
    np.testing.assert_array_equal(top_k_filter(logits, 0), logits)
    assert np.isfinite(logits).all()  # input untouched


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs)
    assert np.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert np.isfinite(top_p_filter(logits, 0.79)).tolist() == [[True, True, False, False]]
    assert np.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert np.isfinite(top_p_filter(logits, 1.0)).all()
    # order of the vocabulary does not matter
    perm = [2, 0, 3, 1]
    assert np.isfinite(top_p_filter(logits[:, perm], 0.79)).tolist() == [[False, True, False, True]]


def test_temperature_and_sampling() -> None:
    logits = np.array([[2.0, 1.0, 0.0]])
    sharp, flat = softmax(apply_temperature(logits, 0.5)), softmax(apply_temperature(logits, 2.0))
    assert sharp[0, 0] > softmax(logits)[0, 0] > flat[0, 0]
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)
    draws = sample(np.repeat(top_k_filter(logits, 2), 4000, axis=0), np.random.default_rng(0))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - softmax(logits[:, :2])[0, 0]) < 0.03


# ------------------------------------------------------------------------------ beam search
def test_beam_size_one_is_greedy() -> None:
    model = tiny_model("sparse_blockwise")
    greedy = generate_text_tokens(model, IMAGES, SPECIALS, SamplingParams(greedy=True))
    assert beam_search_text_tokens(model, IMAGES, SPECIALS, beam_size=1, length_penalty=0.0) == greedy


def test_beam_search_with_and_without_cache_agree() -> None:
    model = tiny_model("sparse_blockwise")
    a = beam_search_text_tokens(model, IMAGES, SPECIALS, beam_size=3, use_cache=True)
    b = beam_search_text_tokens(model, IMAGES, SPECIALS, beam_size=3, use_cache=False)
    assert a == b


def test_wide_beam_finds_the_most_likely_caption() -> None:
    """Vocab of 6 and 3 new tokens at most: a wide beam is exhaustive, so it must return the
    brute-force argmax of the summed log-probability (length_penalty = 0)."""
    V = 6
    model = tiny_model("sparse_blockwise", text_vocab=V, max_text_len=4, seed=3)
    image = IMAGES[:1]
    best_beam = beam_search_text_tokens(model, image, SPECIALS, beam_size=64, length_penalty=0.0)[0]
    # log-probabilities of every continuation, batched: rows = all 3-token strings
    seqs = np.array(list(itertools.product(range(V), repeat=2)))  # [36, 2]
    stepper = CachedStepper(model, Direction.IMG2TXT)
    stepper.start(np.repeat(image.reshape(1, -1), len(seqs), axis=0))
    lp1 = log_softmax(stepper.step(np.full(len(seqs), SPECIALS.bos_id)))
    lp2 = log_softmax(stepper.step(seqs[:, 0]))
    lp3 = log_softmax(stepper.step(seqs[:, 1]))
    eos = SPECIALS.eos_id
    scored = {(): lp1[0, eos]}
    for i, (a, b) in enumerate(seqs):
        if a == eos:
            continue
        scored[(a,)] = lp1[i, a] + lp2[i, eos]
        if b == eos:
            continue
        scored[(a, b)] = lp1[i, a] + lp2[i, b] + lp3[i, eos]
        for c in range(V):
            if c != eos:
                scored[(a, b, c)] = lp1[i, a] + lp2[i, b] + lp3[i, c]  # ran out of length
    best = max(scored, key=scored.get)
    assert tuple(best_beam) == best
