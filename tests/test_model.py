"""The shared bidirectional transformer: shapes, tied heads, Eq. 3 loss, no leakage, the stage module."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from ernie_vilg.config import ModelConfig, load_config
from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG, count_model_params, flops_per_token, num_params

B, L, G, VT, VI = 2, 5, 4, 30, 20
IMPLS = ("dense", "sparse_reference", "sparse_blockwise")


def tiny_cfg(impl: str = "sparse_blockwise", **kw) -> ModelConfig:
    base = dict(num_layers=4, hidden_size=32, num_heads=4, conv_kernel=3, text_vocab_size=VT,
                image_vocab_size=VI, max_text_len=L, image_grid=G, init_std=0.2, attention_impl=impl)
    base.update(kw)
    return ModelConfig(**base)


def build(impl: str = "sparse_blockwise", seed: int = 0, **kw) -> ErnieViLG:
    paddle.seed(seed)
    model = ErnieViLG(tiny_cfg(impl, **kw))
    model.eval()
    return model


def random_batch(seed: int = 0) -> tuple[paddle.Tensor, paddle.Tensor]:
    rng = np.random.default_rng(seed)
    text = rng.integers(5, VT, (B, L))
    text[:, 0], text[0, 3], text[0, 4] = 2, 3, 0  # [CLS] ...; row 0 ends early: [SEP] [PAD]
    return paddle.to_tensor(text), paddle.to_tensor(rng.integers(0, VI, (B, G, G)))


def test_logit_shapes_both_directions() -> None:
    model = build()
    text, image = random_batch()
    assert model(text, image, Direction.TXT2IMG).shape == [B, G * G, VI]
    assert model(text, image, "img2txt").shape == [B, L - 1, VT]
    # a batch may pad its texts to any length up to max_text_len
    assert model(text[:, :3], image, Direction.IMG2TXT).shape == [B, 2, VT]
    with pytest.raises(ValueError, match="max_text_len"):
        model(paddle.concat([text, text], axis=1), image, Direction.TXT2IMG)


def test_heads_are_tied_to_the_input_embeddings() -> None:
    model = build()
    assert model.head_txt.weight is model.tok_emb_txt.weight
    assert model.head_img.weight is model.tok_emb_img.weight
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    text, image = random_batch()
    logits = model(text, image, Direction.TXT2IMG)
    logits.sum().backward()
    assert model.tok_emb_img.weight.grad is not None  # gradient reaches it through the head too


def test_num_params_matches_the_allocated_model() -> None:
    for cfg in (tiny_cfg(), tiny_cfg(num_layers=3, hidden_size=48, num_heads=3, ffn_mult=2)):
        assert num_params(cfg) == count_model_params(ErnieViLG(cfg))
    assert flops_per_token(tiny_cfg("dense")) > flops_per_token(tiny_cfg("sparse_blockwise")) > 0


@pytest.mark.parametrize("options", [dict(tie_heads=False), dict(ffn_act="geglu"), dict(layer_scale_init=0.1),
                                     dict(tie_heads=False, ffn_act="geglu", layer_scale_init=0.1, emb_init_std=1.0)])
def test_recipe_options_count_train_and_decode_like_the_uncached_model(options: dict) -> None:
    from ernie_vilg.generation.decoding import CachedStepper, FullStepper

    cfg = tiny_cfg("dense", **options)
    model = build("dense", **options)
    assert num_params(cfg) == count_model_params(model) > num_params(tiny_cfg("dense"))
    if not options.get("tie_heads", True):
        assert model.head_img.weight is not model.tok_emb_img.weight
    if options.get("ffn_act") == "geglu":
        assert flops_per_token(cfg) > flops_per_token(tiny_cfg("dense"))
    text, image = random_batch()
    cached, full = CachedStepper(model, Direction.TXT2IMG), FullStepper(model, Direction.TXT2IMG)
    np.testing.assert_allclose(cached.start(text.numpy()), full.start(text.numpy()), atol=1e-4)
    for tok in image.numpy().reshape(B, -1).T[:-1]:
        np.testing.assert_allclose(cached.step(tok), full.step(tok), atol=1e-4)
    model.train()
    loss = bidirectional_loss(model, VilgCriterion(pad_id=0), text, image).total
    loss.backward()
    scales = [p for name, p in model.named_parameters() if "scale_" in name]
    assert len(scales) == (2 * 4 if options.get("layer_scale_init") else 0)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in scales)


def test_unknown_ffn_activation_is_refused() -> None:
    with pytest.raises(ValueError, match="ffn_act"):
        ErnieViLG(tiny_cfg(ffn_act="swiglu"))


def test_loss_is_the_sum_of_both_directions_and_ignores_padding() -> None:
    model = build()
    text, image = random_batch()
    crit = VilgCriterion(pad_id=0)
    img_logits, txt_logits = model(text, image, "txt2img"), model(text, image, "img2txt")
    loss = crit(img_logits, image, txt_logits, text)
    assert float(loss.total) == pytest.approx(float(loss.txt2img) + float(loss.img2txt), rel=1e-6)
    # padding target (text[0, 4] = [PAD], predicted by row 3) does not count
    bumped = txt_logits.numpy().copy()
    bumped[0, 3] += np.random.default_rng(1).standard_normal(VT) * 10
    again = crit(img_logits, image, paddle.to_tensor(bumped), text)
    assert float(again.img2txt) == pytest.approx(float(loss.img2txt), rel=1e-6)
    # the text-to-image term is the token-mean NLL
    logp = img_logits.numpy() - np.log(np.exp(img_logits.numpy()).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, image.numpy().reshape(B, -1, 1), -1).mean()
    assert float(loss.txt2img) == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_future_image_tokens_do_not_leak(impl: str) -> None:
    model = build(impl)
    text, image = random_batch()
    base = model(text, image, Direction.TXT2IMG).numpy()
    for k in (0, 5, 10, 15):
        changed = image.numpy().reshape(B, -1).copy()
        changed[:, k] = (changed[:, k] + 1) % VI
        out = model(text, paddle.to_tensor(changed), Direction.TXT2IMG).numpy()
        # row j predicts z_j from z_0 .. z_{j-1}: rows <= k must not see z_k
        np.testing.assert_allclose(out[:, : k + 1], base[:, : k + 1], atol=1e-5)
        if k < G * G - 1:
            assert np.abs(out[:, k + 1:] - base[:, k + 1:]).max() > 1e-4  # ... later rows do


@pytest.mark.parametrize("impl", IMPLS)
def test_future_text_tokens_do_not_leak(impl: str) -> None:
    model = build(impl)
    text, image = random_batch()
    base = model(text, image, Direction.IMG2TXT).numpy()
    for j in range(1, L):
        changed = text.numpy().copy()
        changed[:, j] = (changed[:, j] + 1) % VT
        out = model(paddle.to_tensor(changed), image, Direction.IMG2TXT).numpy()
        np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-5)  # rows < j predict tokens <= j
        if j < L - 1:  # the last text token is only ever a target
            assert np.abs(out[:, j:] - base[:, j:]).max() > 1e-4


def test_text_to_image_source_sees_all_text() -> None:
    model = build()
    text, image = random_batch()
    base = model(text, image, Direction.TXT2IMG).numpy()
    changed = text.numpy().copy()
    changed[:, -1] = (changed[:, -1] + 1) % VT  # the last text token changes the first image logits
    out = model(paddle.to_tensor(changed), image, Direction.TXT2IMG).numpy()
    assert np.abs(out[:, 0] - base[:, 0]).max() > 1e-4


def test_blockwise_model_equals_reference_model() -> None:
    text, image = random_batch()
    ref, blk = build("sparse_reference"), build("sparse_blockwise")
    for direction in Direction:
        np.testing.assert_allclose(blk(text, image, direction).numpy(), ref(text, image, direction).numpy(),
                                   atol=1e-5)


def test_recompute_gives_the_same_gradients() -> None:
    text, image = random_batch()
    grads = []
    for mode in ("none", "full"):
        paddle.seed(0)
        model = ErnieViLG(tiny_cfg(), recompute=mode)
        model.train()
        model(text, image, "txt2img").sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.numpy())
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)


# ------------------------------------------------------------------------------ the stage module
@pytest.fixture(scope="module")
def stage_cfg(tmp_path_factory):
    from ernie_vilg.data.token_shards import TokenShardWriter
    from ernie_vilg.text.vocab import build_vocab

    root = tmp_path_factory.mktemp("vilg")
    texts = ["红色的圆形", "蓝色的正方形", "绿色的三角形", "白色的十字形"]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"{i}.png", "text": t}, ensure_ascii=False) + "\n"
                                for i, t in enumerate(texts)), encoding="utf-8")
    build_vocab([manifest], root / "vocab.txt")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        writer = TokenShardWriter(root / split, grid=4, codebook_size=16, shard_size=5)
        for i in range(count):
            t = texts[i % 4]
            writer.add(rng.integers(0, 16, (4, 4)), t, [t, t + "。"], {"image": f"{i}.png"})
        writer.close()
    repo = Path(__file__).resolve().parents[1]
    return load_config(repo / "configs/vilg/tiny.yaml", [
        f"Data.train_shards={root / 'train'}", f"Data.val_shards={root / 'val'}",
        f"Data.vocab_file={root / 'vocab.txt'}", "Data.max_text_len=12", "Model.max_text_len=12",
        "Data.batch_size=4", "Train.eval_samples=4", f"Global.output_dir={root / 'run'}",
    ])


def test_module_resolves_sizes_and_trains_both_directions(stage_cfg) -> None:
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.module import StepContext

    module = prepare(stage_cfg)
    assert module.cfg.Model.image_grid == 4 and module.cfg.Model.image_vocab_size == 16
    assert module.cfg.Model.text_vocab_size == module.text_tokenizer.vocab_size
    assert stage_cfg.Model.image_grid == 0  # resolving returns a copy
    model = module.build_model()
    batches = module.train_batches(0, 1)
    it = iter(batches)
    batch = next(it)
    assert batch["image_ids"].shape == [4, 4, 4]
    # texts are padded to the longest of the batch: [CLS] + 7 characters + [SEP] at most here
    text = batch["text_ids"].numpy()
    assert text.shape[0] == 4 and text.shape[1] <= 9 and (text[:, -1] != 0).any()
    loss, logs = module.training_step(StepContext(model, model, 0), batch)
    assert set(logs) == {"loss_txt2img", "loss_img2txt"}
    assert float(loss) == pytest.approx(logs["loss_txt2img"] + logs["loss_img2txt"], rel=1e-5)
    # resumable: the batch after a restored state is the batch that followed
    state = batches.state_dict()
    expected = next(it)["image_ids"].numpy()
    again = module.train_batches(0, 1)
    again.set_state_dict(state)
    np.testing.assert_array_equal(next(iter(again))["image_ids"].numpy(), expected)


def test_module_validate_and_save_extras(stage_cfg, tmp_path) -> None:
    from ernie_vilg.stages import prepare

    module = prepare(stage_cfg)
    model = module.build_model()
    model.eval()
    with paddle.no_grad():
        metrics = module.validate(model, 0)
    assert {"val_loss_txt2img", "val_loss_img2txt", "caption_BLEU-4"} <= set(metrics)
    module.save_extras(model, tmp_path)
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8") == Path(stage_cfg.Data.vocab_file).read_text(
        encoding="utf-8")
    assert json.loads((tmp_path / "vilg.json").read_text())["vocab"] == "vocab.txt"


def test_direction_weights_scale_each_term_and_default_to_the_papers_sum() -> None:
    model = build()
    text, image = random_batch(3)
    plain = bidirectional_loss(model, VilgCriterion(pad_id=0), text, image)
    assert float(plain.total) == float(plain.txt2img + plain.img2txt)
    weighted = bidirectional_loss(model, VilgCriterion(pad_id=0, txt2img_weight=3.0, img2txt_weight=0.5), text, image)
    np.testing.assert_allclose(float(weighted.txt2img), float(plain.txt2img), rtol=1e-6)
    np.testing.assert_allclose(float(weighted.total), 3.0 * float(plain.txt2img) + 0.5 * float(plain.img2txt),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="loss weights"):
        VilgCriterion(pad_id=0, txt2img_weight=-1.0)
