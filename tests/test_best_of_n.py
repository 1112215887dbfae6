"""Best-of-N text-to-image: the caption-likelihood signal, rank combination, kept candidates, grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest

from ernie_vilg.config import Config, load_config
from ernie_vilg.generation.best_of_n import (
    Ranking,
    best_of_n,
    caption_log_likelihood,
    rank_candidates_by,
    ranked_grid,
)
from ernie_vilg.generation.pipelines import VilgBundle
from ernie_vilg.models.losses import token_nll
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["红色的圆形", "蓝色的正方形"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> VilgBundle:
    """A random tiny model + a random tiny VQVAE (16 px -> 4 x 4 tokens): enough to exercise the path."""
    import json

    from ernie_vilg.text.tokenizer import TextTokenizer
    from ernie_vilg.text.vocab import build_vocab
    from ernie_vilg.vq.registry import build_tokenizer

    root = tmp_path_factory.mktemp("bon")
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": "x.png", "text": t}, ensure_ascii=False) + "\n"
                                for t in TEXTS), encoding="utf-8")
    build_vocab([manifest], root / "vocab.txt")
    text_tok = TextTokenizer(root / "vocab.txt")
    vq_cfg = load_config(REPO / "configs/vq/tiny_vqvae.yaml", ["Data.image_size=16"])
    paddle.seed(0)
    image_tok = build_tokenizer(vq_cfg.VQ)
    image_tok.eval()
    cfg: Config = load_config(REPO / "configs/vilg/tiny.yaml", [
        "Data.image_size=16", "Data.max_text_len=12", "Model.max_text_len=12",
        f"Model.text_vocab_size={text_tok.vocab_size}", f"Model.image_vocab_size={vq_cfg.VQ.codebook_size}",
        "Model.image_grid=4", "Generation.top_k=8", "Model.init_std=0.3",
    ])
    model = ErnieViLG(cfg.Model)
    model.eval()
    return VilgBundle(cfg, model, text_tok, image_tok, root)


def test_caption_likelihood_is_minus_the_image_to_text_loss(bundle) -> None:
    tok = bundle.text_tokenizer
    text_ids = tok.encode_batch(TEXTS, 12, pad_to_longest=True)  # row 1 longer: row 0 padded
    image_ids = np.random.default_rng(0).integers(0, 32, (2, 4, 4))
    got = caption_log_likelihood(bundle.model, image_ids, text_ids, tok.pad_id)
    for i in range(2):
        t = paddle.to_tensor(text_ids[i:i + 1])
        with paddle.no_grad():
            logits = bundle.model(t, paddle.to_tensor(image_ids[i:i + 1]), Direction.IMG2TXT)
        nll = token_nll(logits, t[:, 1:], t[:, 1:] != tok.pad_id)
        assert got[i] == pytest.approx(-float(nll), rel=1e-5)
    # one shared text row broadcasts over the candidates
    shared = caption_log_likelihood(bundle.model, image_ids, text_ids[1], tok.pad_id)
    assert shared[1] == pytest.approx(got[1], rel=1e-6)


def test_rank_combination_uses_rank_sums_and_keeps_ties_stable() -> None:
    scores = {"reranker": np.array([0.9, 0.1, 0.5, 0.5]), "likelihood": np.array([-3.0, -1.0, -2.0, -2.0])}
    assert rank_candidates_by(scores, "reranker").tolist() == [0, 2, 3, 1]
    assert rank_candidates_by(scores, "likelihood").tolist() == [1, 2, 3, 0]
    # rank sums: c0 0+3, c1 3+0, c2 1+1, c3 2+2 -> c2 first, then c0 and c1 (tie: earlier first), c3
    assert rank_candidates_by(scores, "both").tolist() == [2, 0, 1, 3]
    with pytest.raises(ValueError, match="unknown ranking signal"):
        rank_candidates_by(scores, "clip")


class BrightnessReranker:
    """Stands in for a trained reranker: prefers brighter images (the interface rank_candidates uses)."""

    def _images(self, images):
        return np.asarray(images, dtype=np.float32)

    def score(self, images, texts):
        assert len(texts) == len(images)
        return np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3))


def test_best_of_n_keeps_the_top_k_by_each_signal(bundle) -> None:
    images, rankings = best_of_n(bundle, TEXTS, num_candidates=4, keep=2, signal="likelihood", seed=3)
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    assert len(rankings) == 2
    for r in rankings:
        assert sorted(r.order.tolist()) == [0, 1, 2, 3]
        ll = r.scores["likelihood"]
        assert ll[r.kept[0]] == ll.max() and ll[r.kept[1]] >= np.sort(ll)[-2] - 1e-12
    images2, by_brightness = best_of_n(bundle, TEXTS, 4, 1, "reranker", BrightnessReranker(), seed=3)
    np.testing.assert_array_equal(images, images2)  # same seed, same samples
    for t, r in enumerate(by_brightness):
        brightness = images[t * 4:(t + 1) * 4].astype(np.float64).mean(axis=(1, 2, 3))
        assert r.kept.tolist() == [int(np.argmax(brightness))]
    both = best_of_n(bundle, TEXTS, 4, 1, "both", BrightnessReranker(), seed=3)[1]
    assert set(both[0].scores) == {"reranker", "likelihood"}


def test_best_of_n_refuses_bad_settings(bundle) -> None:
    with pytest.raises(ValueError, match="--keep"):
        best_of_n(bundle, TEXTS, num_candidates=2, keep=3)
    with pytest.raises(ValueError, match="needs a reranker"):
        best_of_n(bundle, TEXTS, num_candidates=2, keep=1, signal="reranker")


def test_ranked_grid_orders_candidates_and_frames_the_kept_ones() -> None:
    images = np.stack([np.full((4, 4, 3), v, dtype=np.uint8) for v in (10, 20, 30)])
    grid = ranked_grid(images, [Ranking("t", np.array([2, 0, 1]), keep=1)], border=1)
    assert grid.shape == (6, 18, 3)
    assert grid[1:5, 1:5].max() == 30 and grid[1:5, 7:11].max() == 10  # best first
    assert tuple(grid[0, 0]) == (40, 200, 60) and tuple(grid[0, 6]) == (90, 90, 90)  # kept vs not


def test_evaluation_best_of_n_keeps_the_most_likely_candidate_and_candidate_zero(bundle) -> None:
    """The quickstart's evaluation: `images` = candidate 0 of each text (a single sample),
    `images_best` = the candidate with the highest caption log-likelihood, on the same samples."""
    from types import SimpleNamespace

    from ernie_vilg.generation.decoding import SamplingParams, generate_image_tokens
    from ernie_vilg.generation.evaluate import run_both_directions
    from ernie_vilg.generation.pipelines import decode_image_ids

    tok, cfg, n = bundle.text_tokenizer, bundle.cfg, 3
    rng = np.random.default_rng(1)
    records = [SimpleNamespace(text=t, texts=[t], meta={}, image_ids=rng.integers(0, 32, (4, 4))) for t in TEXTS]
    with paddle.no_grad():
        metrics, out = run_both_directions(bundle.model, tok, bundle.image_tokenizer, records, cfg, seed=5,
                                           num_candidates=n)
        text_ids = tok.encode_batch(TEXTS, cfg.Data.max_text_len, pad_to_longest=True)
        gen = cfg.Generation
        params = SamplingParams(greedy=False, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
        ids = generate_image_tokens(bundle.model, text_ids, params, num_candidates=n, seed=5)
        loglik = caption_log_likelihood(bundle.model, ids, np.repeat(text_ids, n, axis=0), tok.pad_id)
    pick = loglik.reshape(len(TEXTS), n).argmax(axis=1)
    grids = ids.reshape(len(TEXTS), n, 4, 4)
    np.testing.assert_array_equal(out["images"], decode_image_ids(bundle.image_tokenizer, grids[:, 0]))
    np.testing.assert_array_equal(out["images_best"],
                                  decode_image_ids(bundle.image_tokenizer, grids[np.arange(len(TEXTS)), pick]))
    assert "caption_BLEU-4" in metrics
    with pytest.raises(ValueError, match="num_candidates"):
        run_both_directions(bundle.model, tok, bundle.image_tokenizer, records, cfg, num_candidates=0)
