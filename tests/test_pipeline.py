"""The pretrained folder (convert_checkpoint to-pretrained), fp16 / bf16 weights, ErnieViLGPipeline
and image completion (kept tokens unchanged, cached == uncached)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from gen_fixture import REPO, write_tiny_checkpoint


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=180)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def pretrained(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "ernie-vilg-tiny"
    res = _tool(str(REPO / "tools/convert_checkpoint.py"), "to-pretrained", "--ckpt", str(ckpt), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(out) and res.stderr.strip() == ""  # no paddlenlp chatter
    return out


@pytest.fixture(scope="module")
def pipe(pretrained):
    from ernie_vilg import ErnieViLGPipeline

    return ErnieViLGPipeline.from_pretrained(pretrained)


# ------------------------------------------------------------------------------ pretrained folder
def test_pretrained_folder_has_paddlenlp_layout_and_autotokenizer_loads_it(pretrained, ckpt) -> None:
    from paddlenlp.transformers import AutoTokenizer

    from ernie_vilg.pipeline import load_bundle

    names = {p.name for p in pretrained.iterdir()}
    assert {"config.json", "model_state.pdparams", "generation_config.json", "vocab.txt", "tokenizer_config.json",
            "image_tokenizer"} <= names
    info = json.loads((pretrained / "config.json").read_text(encoding="utf-8"))
    assert info["model_type"] == "ernie_vilg" and info["hidden_size"] == 32 and info["dtype"] == "float32"
    assert json.loads((pretrained / "generation_config.json").read_text())["top_k"] == 8
    auto = AutoTokenizer.from_pretrained(str(pretrained))
    ours = load_bundle(ckpt).text_tokenizer
    text = "红色的圆在左"
    assert auto(text)["input_ids"] == ours.encode(text, 32)
    a, b = load_bundle(pretrained), load_bundle(ckpt)
    for key, value in b.model.state_dict().items():
        np.testing.assert_array_equal(a.model.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    assert a.cfg.Model == b.cfg.Model and a.cfg.Generation == b.cfg.Generation and a.cfg.Data == b.cfg.Data


@pytest.mark.parametrize("dtype, safetensors", [("bfloat16", False), ("float16", True), ("bfloat16", True)])
def test_half_precision_pretrained_folders_load_cast_to_float32(ckpt, tmp_path, dtype, safetensors) -> None:
    from ernie_vilg.pipeline import load_bundle
    from ernie_vilg.generation.pipelines import save_pretrained

    out = save_pretrained(load_bundle(ckpt, need_image_tokenizer=True), tmp_path / dtype, safetensors=safetensors,
                          dtype=dtype)
    assert (out / ("model.safetensors" if safetensors else "model_state.pdparams")).is_file()
    half, full = load_bundle(out), load_bundle(ckpt)
    tol = 1e-2 if dtype == "bfloat16" else 1e-3
    for key, value in full.model.state_dict().items():
        got = half.model.state_dict()[key]
        assert got.dtype == value.dtype == paddle.float32, key
        np.testing.assert_allclose(got.numpy(), value.numpy(), rtol=tol, atol=tol, err_msg=key)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_merges_load_in_the_tools(ckpt, tmp_path, dtype) -> None:
    """tools/merge_checkpoint.py --dtype used to give a folder no tool could load (a raw
    AssertionError from Paddle's set_value)."""
    merged = tmp_path / dtype
    res = _tool(str(REPO / "tools/merge_checkpoint.py"), "--ckpt", str(ckpt), "--out", str(merged), "--dtype", dtype)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _tool(str(REPO / "tools/generate.py"), "--ckpt", str(merged), "--text", "红色的圆", "--out",
                str(tmp_path / "img"), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "img" / "00000.png").is_file()


def test_pretrained_folder_errors_are_one_line(tmp_path) -> None:
    res = _tool(str(REPO / "tools/convert_checkpoint.py"), "to-pretrained", "--ckpt", str(tmp_path / "none"),
                "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "not found" in res.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "ernie_vilg"}', encoding="utf-8")
    from ernie_vilg.config import ConfigError
    from ernie_vilg.pipeline import load_bundle

    with pytest.raises(ConfigError, match="generation_config.json"):
        load_bundle(broken)


# ------------------------------------------------------------------------------ the pipeline
def test_pipeline_generates_seeded_images_and_captions_them(pipe) -> None:
    from PIL import Image

    images = pipe("一个红色的圆", num_images=3, seed=0, cfg_scale=2.0)
    assert len(images) == 3 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
    again = pipe("一个红色的圆", num_images=3, seed=0, cfg_scale=2.0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    other = pipe("一个红色的圆", num_images=3, seed=1, cfg_scale=2.0)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, other))
    # a text's images do not depend on the other texts of the call
    both = pipe(["一个红色的圆", "蓝方"], num_images=3, seed=0, cfg_scale=2.0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, both[:3]))
    captions = pipe.caption(images)
    assert isinstance(captions, list) and len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert pipe.caption(images[0]) == captions[0]  # one image in, one string out
    assert isinstance(pipe.caption(np.asarray(images[0]), strategy="beam", beam_size=2), str)
    assert isinstance(pipe.answer(images[0], "什么颜色"), str)
    with pytest.raises(ValueError, match="uint8"):
        pipe.caption(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="cfg_scale"):
        pipe("红", cfg_scale=0)


def test_pipeline_complete_keeps_the_top_rows(pipe, monkeypatch) -> None:
    from ernie_vilg.generation import pipelines

    image = pipe("一个红色的圆", seed=3)[0]
    seen = {}
    real = pipelines.text_to_image_ids

    def spy(*args, **kw):
        ids = real(*args, **kw)
        seen["ids"], seen["prefix"] = ids, kw["prefix_ids"]
        return ids

    monkeypatch.setattr(pipelines, "text_to_image_ids", spy)
    out = pipe.complete(image, keep_rows=2, text="蓝色的方", num_images=2, seed=0)
    assert len(out) == 2
    kept = pipe.encode_images(image)[0, :2]
    np.testing.assert_array_equal(seen["prefix"], kept.reshape(-1))
    for grid in seen["ids"]:
        np.testing.assert_array_equal(grid[:2], kept)  # the kept rows, token for token
    with pytest.raises(ValueError, match="keep_rows"):
        pipe.complete(image, keep_rows=0, text="x")


@pytest.mark.parametrize("greedy", [True, False])
def test_completion_keeps_the_prefix_and_cached_equals_uncached(pipe, greedy) -> None:
    from ernie_vilg.generation.decoding import SamplingParams, generate_image_tokens

    b = pipe.bundle
    text = b.text_tokenizer.encode_batch(["红色的圆", "蓝方在下"], b.cfg.Data.max_text_len)
    prefix = np.random.default_rng(0).integers(0, b.cfg.Model.image_vocab_size, (2, 6))
    params = SamplingParams(greedy=greedy, top_k=8)
    runs = [generate_image_tokens(b.model, text, params, num_candidates=2, seed=[5, 6], use_cache=c,
                                  prefix_ids=prefix, specials=b.specials, cfg_scale=1.5) for c in (True, False)]
    np.testing.assert_array_equal(runs[0], runs[1])
    flat = runs[0].reshape(4, -1)
    np.testing.assert_array_equal(flat[:, :6], np.repeat(prefix, 2, axis=0))
    with pytest.raises(ValueError, match="prefix_ids"):
        generate_image_tokens(b.model, text, params, prefix_ids=np.zeros((3, 2), dtype=np.int64))


def test_generate_tool_completes_an_init_image(ckpt, pipe, tmp_path) -> None:
    src = tmp_path / "src.png"
    pipe("红色的圆", seed=0)[0].save(src)
    res = _tool(str(REPO / "tools/generate.py"), "--ckpt", str(ckpt), "--text", "蓝色的方", "--init-image", str(src),
                "--keep-rows", "2", "--num-candidates", "2", "--out", str(tmp_path / "c"), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "c" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["image"] for r in rows] == ["00000_0.png", "00000_1.png"] and all(r["keep_rows"] == 2 for r in rows)
    bad = _tool(str(REPO / "tools/generate.py"), "--ckpt", str(ckpt), "--text", "x", "--init-image", str(src),
                "--keep-rows", "9", "--out", str(tmp_path / "d"))
    assert bad.returncode == 2 and "--keep-rows must be in [1, 4]" in bad.stderr


def test_images_are_resized_to_the_size_the_tokenizer_was_trained_at(tmp_path) -> None:
    """A vilg config may keep its base's Data.image_size (the quickstart's says 64 px, its
    tokenizer and shards are 48 px): images given to the tools must be resized so that the
    tokenizer makes the model's grid, or captioning fails on a token-count mismatch."""
    from ernie_vilg.generation.pipelines import caption_images
    from ernie_vilg.pipeline import load_bundle

    ckpt = write_tiny_checkpoint(tmp_path / "m", 0, "Data.image_size=64")
    bundle = load_bundle(ckpt, need_image_tokenizer=True)
    assert bundle.cfg.Data.image_size == 16 and bundle.cfg.Model.image_grid == 4
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    assert len(caption_images(bundle, [tmp_path / "red.png"])) == 1


def test_completion_is_measured_by_the_judge_against_the_new_caption(pipe) -> None:
    from types import SimpleNamespace

    from ernie_vilg.data.shapes import make_item
    from ernie_vilg.generation.completion import evaluate_completion

    records = []
    for i in range(4):
        img, rec = make_item(0, "test", i, size=16)
        ids = pipe.encode_images(np.asarray(img))[0]
        records.append(SimpleNamespace(image_ids=ids, text=rec["text"], meta={"attrs": rec["attrs"]}))
    result = evaluate_completion(pipe.bundle, records, [0, 2], seed=0, batch_size=3)
    assert set(result["keep_rows"]) == {"0", "2"} and result["items"] == 4
    for row in result["keep_rows"].values():
        assert row["kept_rows_intact"] == 1.0
        assert all(0.0 <= row[k] <= 1.0 for k in ("new_all", "new_shape", "source_all"))
    with pytest.raises(ValueError, match="keep-rows must be in"):
        evaluate_completion(pipe.bundle, records, [4])
    with pytest.raises(ValueError, match="attrs"):
        evaluate_completion(pipe.bundle, [SimpleNamespace(image_ids=None, text="x", meta={})] * 2, [0])
