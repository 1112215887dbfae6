"""Classifier-free guidance: null conditions, seeded condition dropping, guided decoding in both
directions (one batch of 2B rows over one cache), and old checkpoints without null_img_emb."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import paddle
import pytest

from vilg_fixture import write_tiny_vilg_data

from ernie_vilg.config import ModelConfig, load_config
from ernie_vilg.generation.decoding import (
    CachedStepper,
    FullStepper,
    GuidedStepper,
    SamplingParams,
    TextSpecials,
    beam_search_text_tokens,
    generate_image_tokens,
    generate_text_tokens,
    guided,
)
from ernie_vilg.models.guidance import (
    I2T_IMAGE_KEY,
    NULL_IMAGE_ID,
    T2I_TEXT_KEY,
    ConditionDropper,
    drop_conditions,
    null_image_ids,
    null_text_ids,
)
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG
from ernie_vilg.checkpoint_io import CheckpointError, set_model_state

REPO = Path(__file__).resolve().parents[1]
SPECIALS = TextSpecials(bos_id=2, eos_id=3, pad_id=0)
L, G, V_IMG = 6, 4, 20
rng = np.random.default_rng(0)
TEXT = rng.integers(5, 30, (3, L))
TEXT[:, 0] = 2
OTHER_TEXT = rng.integers(5, 30, (3, L))
OTHER_TEXT[:, 0] = 2
IMAGES = rng.integers(0, V_IMG, (3, G, G))
OTHER_IMAGES = rng.integers(0, V_IMG, (3, G, G))
SAMPLING = SamplingParams(greedy=False, temperature=1.0, top_k=6, top_p=0.95)


def tiny_model(impl: str = "sparse_blockwise", seed: int = 0) -> ErnieViLG:
    paddle.seed(seed)
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_heads=4, conv_kernel=3, text_vocab_size=30,
                      image_vocab_size=V_IMG, max_text_len=L, image_grid=G, init_std=0.3, attention_impl=impl)
    model = ErnieViLG(cfg)
    # a random (not zero) null embedding, as a trained model would have
    model.null_img_emb.set_value(paddle.randn([32]) * 0.3)
    model.eval()
    return model


def null_text(src: np.ndarray) -> np.ndarray:
    return null_text_ids(len(src), src.shape[1], SPECIALS.bos_id, SPECIALS.eos_id, SPECIALS.pad_id)


def null_image(src: np.ndarray) -> np.ndarray:
    return null_image_ids(len(src), src.shape[1])


# ------------------------------------------------------------------------------ scale 1 = plain
def test_scale_one_takes_the_plain_path_token_for_token() -> None:
    model = tiny_model()
    plain = CachedStepper(model, Direction.TXT2IMG)
    assert guided(plain, 1.0, null_text) is plain  # no doubled batch
    np.testing.assert_array_equal(
        generate_image_tokens(model, TEXT, SAMPLING, num_candidates=2, seed=3),
        generate_image_tokens(model, TEXT, SAMPLING, num_candidates=2, seed=3, cfg_scale=1.0, specials=SPECIALS))
    for params in (SamplingParams(greedy=True), SAMPLING):
        assert (generate_text_tokens(model, IMAGES, SPECIALS, params, seed=4)
                == generate_text_tokens(model, IMAGES, SPECIALS, params, seed=4, cfg_scale=1.0))
    assert (beam_search_text_tokens(model, IMAGES, SPECIALS, 3)
            == beam_search_text_tokens(model, IMAGES, SPECIALS, 3, cfg_scale=1.0))


def test_text_to_image_guidance_needs_the_specials() -> None:
    with pytest.raises(ValueError, match="specials"):
        generate_image_tokens(tiny_model(), TEXT, SAMPLING, cfg_scale=2.0)


# ------------------------------------------------------------------------------ the two halves
def test_guided_logits_mix_the_conditional_and_the_null_condition_rows() -> None:
    model = tiny_model()
    scale = 2.5
    g = GuidedStepper(CachedStepper(model, Direction.TXT2IMG), scale, null_text)
    cond, uncond = CachedStepper(model, Direction.TXT2IMG), CachedStepper(model, Direction.TXT2IMG)
    mixed, c, u = g.start(TEXT), cond.start(TEXT), uncond.start(null_text(TEXT))
    assert g.inner.cache.batch_size == 2 * len(TEXT)  # one cache for both halves
    np.testing.assert_allclose(g.last_cond, c, atol=1e-4)
    np.testing.assert_allclose(g.last_uncond, u, atol=1e-4)
    np.testing.assert_allclose(mixed, u + scale * (c - u), atol=1e-3)
    tok = IMAGES.reshape(3, -1)[:, 0]
    mixed, c, u = g.step(tok), cond.step(tok), uncond.step(tok)
    np.testing.assert_allclose(mixed, u + scale * (c - u), atol=1e-3)


def test_the_unconditional_text_to_image_row_sees_no_text() -> None:
    model = tiny_model()
    a = GuidedStepper(CachedStepper(model, Direction.TXT2IMG), 3.0, null_text)
    b = GuidedStepper(CachedStepper(model, Direction.TXT2IMG), 3.0, null_text)
    a.start(TEXT), b.start(OTHER_TEXT)
    for tok in IMAGES.reshape(3, -1).T[:4]:
        np.testing.assert_allclose(a.last_uncond, b.last_uncond, atol=1e-5)
        assert np.abs(a.last_cond - b.last_cond).max() > 1e-3  # the conditional rows do see it
        a.step(tok), b.step(tok)


def test_the_unconditional_caption_row_sees_no_image() -> None:
    model = tiny_model()
    a = GuidedStepper(CachedStepper(model, Direction.IMG2TXT), 3.0, null_image)
    b = GuidedStepper(CachedStepper(model, Direction.IMG2TXT), 3.0, null_image)
    a.start(IMAGES.reshape(3, -1)), b.start(OTHER_IMAGES.reshape(3, -1))
    for tok in TEXT.T[:-1]:
        a.step(tok), b.step(tok)
        np.testing.assert_allclose(a.last_uncond, b.last_uncond, atol=1e-5)
        assert np.abs(a.last_cond - b.last_cond).max() > 1e-3


# ------------------------------------------------------------------------------ cached = uncached
@pytest.mark.parametrize("impl", ("dense", "sparse_blockwise"))
def test_guided_decoding_cached_equals_uncached(impl: str) -> None:
    model = tiny_model(impl)
    for params in (SamplingParams(greedy=True), SAMPLING):
        np.testing.assert_array_equal(
            generate_image_tokens(model, TEXT, params, num_candidates=2, seed=1, cfg_scale=3.0, specials=SPECIALS),
            generate_image_tokens(model, TEXT, params, num_candidates=2, seed=1, cfg_scale=3.0, specials=SPECIALS,
                                  use_cache=False))
        assert (generate_text_tokens(model, IMAGES, SPECIALS, params, seed=2, cfg_scale=2.0)
                == generate_text_tokens(model, IMAGES, SPECIALS, params, seed=2, cfg_scale=2.0, use_cache=False))
    assert (beam_search_text_tokens(model, IMAGES, SPECIALS, 3, cfg_scale=2.0)
            == beam_search_text_tokens(model, IMAGES, SPECIALS, 3, cfg_scale=2.0, use_cache=False))
    # and the logits themselves, step by step, against the FullStepper reference
    cached = GuidedStepper(CachedStepper(model, Direction.TXT2IMG), 3.0, null_text)
    full = GuidedStepper(FullStepper(model, Direction.TXT2IMG), 3.0, null_text)
    np.testing.assert_allclose(cached.start(TEXT), full.start(TEXT), atol=1e-3)
    for tok in IMAGES.reshape(3, -1).T[:-1]:
        np.testing.assert_allclose(cached.step(tok), full.step(tok), atol=1e-3)


def test_guidance_changes_the_samples_and_they_stay_valid_ids() -> None:
    model = tiny_model()
    plain = generate_image_tokens(model, TEXT, SamplingParams(greedy=True))
    strong = generate_image_tokens(model, TEXT, SamplingParams(greedy=True), cfg_scale=5.0, specials=SPECIALS)
    assert strong.shape == plain.shape and (strong != plain).any()
    assert strong.min() >= 0 and strong.max() < V_IMG  # the head has no row for the null id
    assert model.head_img.weight.shape[0] == V_IMG


# ------------------------------------------------------------------------------ null embedding
def test_null_image_id_takes_the_null_embedding_plus_positions() -> None:
    model = tiny_model()
    ids = paddle.to_tensor(np.array([[1, NULL_IMAGE_ID, 3, NULL_IMAGE_ID]], dtype=np.int64))
    with paddle.no_grad():
        emb = model._embed_image(ids, 0).numpy()[0]
        pos = (model.pos_emb_row.weight[0] + model.pos_emb_col.weight[1]).numpy()
        np.testing.assert_allclose(emb[1], model.null_img_emb.numpy() + pos, atol=1e-6)
        real = (model.tok_emb_img.weight[1] + model.pos_emb_row.weight[0] + model.pos_emb_col.weight[0]).numpy()
        np.testing.assert_allclose(emb[0], real, atol=1e-6)


# ------------------------------------------------------------------------------ drop_conditions
def _batch(B: int = 8, width: int = 7) -> dict[str, paddle.Tensor]:
    r = np.random.default_rng(1)
    text = r.integers(5, 30, (B, width))
    text[:, 0] = 2
    return {"text_ids": paddle.to_tensor(text), "image_ids": paddle.to_tensor(r.integers(0, V_IMG, (B, G, G)))}


def test_drop_conditions_zero_and_one() -> None:
    batch = _batch()
    assert drop_conditions(batch, 0.0, 0, 5, 2, 3, 0) is batch
    out = drop_conditions(batch, 1.0, 0, 5, 2, 3, 0)
    np.testing.assert_array_equal(out[T2I_TEXT_KEY].numpy(), null_text_ids(8, 7, 2, 3, 0))
    assert (out[I2T_IMAGE_KEY].numpy() == NULL_IMAGE_ID).all() and out[I2T_IMAGE_KEY].shape == [8, G, G]
    # the real inputs (the other stream's condition and both targets) are untouched
    np.testing.assert_array_equal(out["text_ids"].numpy(), batch["text_ids"].numpy())
    np.testing.assert_array_equal(out["image_ids"].numpy(), batch["image_ids"].numpy())
    with pytest.raises(ValueError, match="cond_drop"):
        drop_conditions(batch, 1.5, 0, 5, 2, 3, 0)


def test_drop_conditions_half_is_seeded_and_per_direction() -> None:
    batch = _batch(B=400)
    text, image = batch["text_ids"].numpy(), batch["image_ids"].numpy()

    def masks(seed: int, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        out = drop_conditions(batch, 0.5, seed, step, 2, 3, 0, micro=micro)
        t2i = (out[T2I_TEXT_KEY].numpy() != text).any(axis=1)
        i2t = (out[I2T_IMAGE_KEY].numpy() == NULL_IMAGE_ID).reshape(400, -1).all(axis=1)
        # a dropped row is all null, a kept row all real
        assert ((out[I2T_IMAGE_KEY].numpy() == image).reshape(400, -1).all(axis=1) == ~i2t).all()
        return t2i, i2t

    t2i, i2t = masks(0, 7)
    assert 0.4 < t2i.mean() < 0.6 and 0.4 < i2t.mean() < 0.6
    assert (t2i != i2t).any()  # the two streams drop independently
    again = masks(0, 7)
    np.testing.assert_array_equal(again[0], t2i)
    np.testing.assert_array_equal(again[1], i2t)
    assert (masks(0, 8)[0] != t2i).any() and (masks(1, 7)[0] != t2i).any() and (masks(0, 7, micro=1)[0] != t2i).any()


def test_condition_dropper_counts_micro_batches_and_restarts_like_a_resume() -> None:
    batch = _batch(B=64)
    run = ConditionDropper(0.5, 0, 2, 3, 0)
    first, second = run(batch, 3), run(batch, 3)  # two micro batches of step 3
    assert (first[T2I_TEXT_KEY].numpy() != second[T2I_TEXT_KEY].numpy()).any()
    resumed = ConditionDropper(0.5, 0, 2, 3, 0)  # a new process resuming at step 3
    np.testing.assert_array_equal(resumed(batch, 3)[T2I_TEXT_KEY].numpy(), first[T2I_TEXT_KEY].numpy())
    np.testing.assert_array_equal(run(batch, 4)[I2T_IMAGE_KEY].numpy(),
                                  drop_conditions(batch, 0.5, 0, 4, 2, 3, 0)[I2T_IMAGE_KEY].numpy())


# ------------------------------------------------------------------------------ checkpoints
def test_a_state_dict_without_null_img_emb_still_loads(tmp_path, caplog) -> None:
    src, dst = tiny_model(seed=1), tiny_model(seed=2)
    state = {k: v for k, v in src.state_dict().items() if k != "null_img_emb"}
    before = dst.null_img_emb.numpy().copy()
    with caplog.at_level(logging.WARNING):
        set_model_state(dst, state, tmp_path)
    assert "null_img_emb" in caplog.text
    np.testing.assert_array_equal(dst.null_img_emb.numpy(), before)  # keeps its own value
    np.testing.assert_array_equal(dst.blocks[0].ln1.weight.numpy(), src.blocks[0].ln1.weight.numpy())
    state.pop("dir_emb.weight")
    with pytest.raises(CheckpointError, match="dir_emb"):  # any other missing key still fails
        set_model_state(dst, state, tmp_path)


# ------------------------------------------------------------------------------ training
def _vilg_cfg(tmp_path: Path, *extra: str):
    data = write_tiny_vilg_data(tmp_path / "data")
    common = ["Train.progress_bar=false", "Train.max_minutes=0.0", f"Global.output_dir={tmp_path / 'run'}",
              "Train.eval_every=0", "Data.batch_size=8"]
    return load_config(REPO / "configs" / "vilg" / "tiny.yaml", data + common + list(extra))


def test_a_training_step_with_cond_drop_gives_finite_losses_and_trains_the_null_embedding(tmp_path) -> None:
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.module import StepContext

    cfg = _vilg_cfg(tmp_path, "Train.cond_drop=1.0")
    module = prepare(cfg)
    model = module.build_model()
    batch = next(iter(module.train_batches(0, 1)))
    loss, logs = module.training_step(StepContext(model, model, 0), batch)
    assert np.isfinite(float(loss)) and all(np.isfinite(v) for v in logs.values())
    loss.backward()
    assert float(model.null_img_emb.grad.abs().sum()) > 0  # every i2t image was null
    # cond_drop 0: the plain streams, and null_img_emb still in the graph (zero gradient)
    module0 = prepare(_vilg_cfg(tmp_path / "zero"))
    model0 = module0.build_model()
    loss0, _ = module0.training_step(StepContext(model0, model0, 0), batch)
    plain = module0.losses(model0, batch)
    assert float(loss0) == pytest.approx(float(plain.total))
    loss0.backward()
    assert model0.null_img_emb.grad is not None and float(model0.null_img_emb.grad.abs().sum()) == 0.0


def test_training_with_cond_drop_resumes_and_an_old_checkpoint_loads(tmp_path) -> None:
    from ernie_vilg.pipeline import load_bundle
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.trainer import Trainer

    cfg = _vilg_cfg(tmp_path, "Train.cond_drop=0.5", "Train.max_steps=2", "Train.save_every=2")
    module = prepare(cfg)
    result = Trainer(module.cfg, module).fit()
    ckpt = Path(result["checkpoint"])
    # make it an old checkpoint: no null_img_emb in the weights
    from ernie_vilg.checkpoint_io import load_model_state, save_weights

    state = load_model_state(ckpt)
    assert "null_img_emb" in state
    del state["null_img_emb"]
    save_weights(ckpt, state)
    bundle = load_bundle(ckpt)
    assert "null_img_emb" in bundle.model.state_dict()
    # and the Trainer resumes from it (weights and optimizer state without the parameter)
    cfg = _vilg_cfg(tmp_path, "Train.cond_drop=0.5", "Train.max_steps=3", "Train.save_every=3")
    module = prepare(cfg)
    result = Trainer(module.cfg, module).fit()
    assert int(result["step"]) == 3


# ------------------------------------------------------------------------------ the scale sweep
def test_guidance_scales_benchmark_writes_the_table(tmp_path, monkeypatch) -> None:
    """benchmarks/guidance_scales.py on a random tiny model + tiny VQVAE: the table's shape and
    keys (not its numbers)."""
    import importlib.util
    import json

    from ernie_vilg.config import Config
    from ernie_vilg.data.shapes import make_item
    from ernie_vilg.data.token_shards import TokenShardWriter
    from ernie_vilg import pipeline
    from ernie_vilg.generation import pipelines
    from ernie_vilg.text.tokenizer import TextTokenizer
    from ernie_vilg.text.vocab import build_vocab
    from ernie_vilg.vq.registry import build_tokenizer

    items = [make_item(0, "test", i, size=16)[1] for i in range(3)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": "x.png", "text": t}, ensure_ascii=False) + "\n"
                                for it in items for t in it["texts"]), encoding="utf-8")
    build_vocab([manifest], tmp_path / "vocab.txt")
    text_tok = TextTokenizer(tmp_path / "vocab.txt")
    vq_cfg = load_config(REPO / "configs/vq/tiny_vqvae.yaml", ["Data.image_size=16"])
    paddle.seed(0)
    image_tok = build_tokenizer(vq_cfg.VQ)
    image_tok.eval()
    grid, codebook = 4, vq_cfg.VQ.codebook_size
    cfg: Config = load_config(REPO / "configs/vilg/tiny.yaml", [
        "Data.image_size=16", "Data.max_text_len=40", "Model.max_text_len=40",
        f"Model.text_vocab_size={text_tok.vocab_size}", f"Model.image_vocab_size={codebook}",
        f"Model.image_grid={grid}", "Generation.top_k=8", "Generation.max_text_len=8"])
    model = ErnieViLG(cfg.Model)
    model.eval()
    bundle = pipelines.VilgBundle(cfg, model, text_tok, image_tok, tmp_path)
    writer = TokenShardWriter(tmp_path / "test", grid, codebook, shard_size=8)
    r = np.random.default_rng(0)
    for it in items:
        writer.add(r.integers(0, codebook, (grid, grid)), it["text"], it["texts"], {"attrs": it["attrs"]})
    writer.close()
    monkeypatch.setattr(pipeline, "load_bundle", lambda ckpt, need_image_tokenizer=False: bundle)
    spec = importlib.util.spec_from_file_location("guidance_scales", REPO / "benchmarks" / "guidance_scales.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sweep"
    assert bench.main(["--ckpt", "unused", "--shards", str(tmp_path / "test"), "--scales", "0,1,2",
                       "--caption-scales", "1,1.5", "--max-items", "2", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads(Path(f"{out}.json").read_text(encoding="utf-8"))
    assert result["items"] == 2
    assert [row["cfg_scale"] for row in result["text_to_image"]] == [0.0, 1.0, 2.0]
    assert [row["cfg_scale"] for row in result["captions"]] == [1.0, 1.5]
    for row in result["text_to_image"]:
        assert {f"judge_{a}" for a in bench.JUDGE_ATTRS} <= set(row) and all(0 <= row[f"judge_{a}"] <= 100
                                                                            for a in bench.JUDGE_ATTRS)
    for row in result["captions"]:
        assert "caption_CIDEr" in row and np.isfinite(row["caption_CIDEr"])
    table = Path(f"{out}.md").read_text(encoding="utf-8")
    assert "| text-to-image (judge accuracy, %): cfg_scale |" in table and "| 1.5 |" in table
