"""Inference export: tools/export.py writes paddle.jit static graphs that paddle.jit.load and Paddle
Inference load, and they give the same outputs as the dygraph model on CPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_safetensors import load_tool, make_checkpoint, tiny_vilg_config  # noqa: E402

from ernie_vilg.convert.export import load_predictor, run_predictor  # noqa: E402
from ernie_vilg.convert.safetensors_io import build_model_for  # noqa: E402
from ernie_vilg.models.sparse_masks import Direction  # noqa: E402
from ernie_vilg.checkpoint_io import load_model_state, set_model_state  # noqa: E402
from ernie_vilg.vq.registry import load_tokenizer  # noqa: E402

BATCH = 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_vilg_config()
    ckpt = make_checkpoint(root / "ckpts", cfg)
    out = root / "out"
    assert load_tool("export").main(["--ckpt", str(ckpt), "--out", str(out), "--batch-size", str(BATCH)]) == 0
    model = build_model_for(cfg)
    set_model_state(model, load_model_state(ckpt), ckpt)
    model.eval()
    rng = np.random.default_rng(0)
    m = cfg.Model
    text = rng.integers(0, m.text_vocab_size, size=(BATCH, m.max_text_len)).astype("int64")
    image = rng.integers(0, m.image_vocab_size, size=(BATCH, m.image_grid ** 2)).astype("int64")
    return out, ckpt, model, text, image


def test_export_writes_the_documented_graphs(exported):
    out, *_ = exported
    info = json.loads((out / "export.json").read_text())
    assert [g["name"] for g in info["graphs"]] == ["txt2img_logits", "img2txt_logits", "vq_decoder"]
    for g in info["graphs"]:
        assert (out / f"{g['name']}.pdiparams").is_file()


@pytest.mark.parametrize("name, direction", [("txt2img_logits", Direction.TXT2IMG),
                                             ("img2txt_logits", Direction.IMG2TXT)])
def test_transformer_graphs_match_dygraph_via_jit_load(exported, name, direction):
    out, _, model, text, image = exported
    with paddle.no_grad():
        expected = model(paddle.to_tensor(text), paddle.to_tensor(image), direction).numpy()
    got = paddle.jit.load(str(out / name))(paddle.to_tensor(text), paddle.to_tensor(image)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_predictor_gives_dygraph_output_and_one_call_is_one_decoding_step(exported):
    out, _, model, text, image = exported
    predictor = load_predictor(out / "txt2img_logits")
    with paddle.no_grad():
        expected = model(paddle.to_tensor(text), paddle.to_tensor(image), Direction.TXT2IMG).numpy()
    got = run_predictor(predictor, text, image)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # row k sees only image_ids[:, :k]: tokens not generated yet may hold anything
    k = 5
    scrambled = image.copy()
    scrambled[:, k:] = (scrambled[:, k:] + 7) % model.cfg.image_vocab_size
    np.testing.assert_allclose(run_predictor(predictor, text, scrambled)[:, :k + 1], got[:, :k + 1], rtol=1e-5, atol=1e-6)


def test_vq_decoder_graph_matches_dygraph_with_any_batch(exported):
    out, ckpt, *_ = exported
    tokenizer = load_tokenizer(ckpt / "image_tokenizer")
    from ernie_vilg.checkpoint_io import load_checkpoint_config

    g = tokenizer.grid_size(load_checkpoint_config(ckpt / "image_tokenizer")[1].Data.image_size)
    ids = np.random.default_rng(1).integers(0, tokenizer.codebook_size, size=(3, g, g)).astype("int64")
    expected = tokenizer.decode_ids(paddle.to_tensor(ids)).numpy()
    np.testing.assert_allclose(run_predictor(load_predictor(out / "vq_decoder"), ids), expected, rtol=1e-5, atol=1e-6)
    got = paddle.jit.load(str(out / "vq_decoder"))(paddle.to_tensor(ids[:1])).numpy()
    np.testing.assert_allclose(got, expected[:1], rtol=1e-5, atol=1e-6)
