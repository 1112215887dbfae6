"""Every stage of the registry (`ernie_vilg.stages.STAGES`), end to end on tiny data: train a
checkpoint, round-trip it through safetensors bit for bit, export its graphs (the eager model and
the exported graph agree), and load it in the tool that uses it.

One test per stage; they share one tiny shapes world (32 px) and the checkpoints they depend on.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import pytest

from ernie_vilg.checkpoint_io import load_checkpoint_config, load_model_state
from ernie_vilg.config import load_config
from ernie_vilg.stages import STAGES, build_bare_model, prepare
from ernie_vilg.training.trainer import Trainer


REPO = Path(__file__).resolve().parents[1]
COMMON = ["Train.max_steps=2", "Train.eval_every=0", "Train.save_every=0", "Train.log_every=1",
          "Train.progress_bar=false", "Train.max_minutes=0.0", "Global.num_threads=1", "Data.image_size=32"]
TINY_TOKENIZER = ["VQ.hidden_channels=8", "VQ.channel_mult=[1, 2]", "VQ.num_res_blocks=1", "VQ.downsample_factor=8",
                  "VQ.patch_size=4", "VQ.codebook_size=16", "VQ.embed_dim=8", "Data.batch_size=4"]
TINY_VILG = ["Model.num_layers=2", "Model.hidden_size=32", "Model.num_heads=2", "Model.conv_kernel=3",
             "Data.batch_size=4", "Data.max_text_len=48", "Model.max_text_len=48", "Data.stream_partitions=1"]


def train(config: str, out: Path, overrides: list[str]) -> Path:
    cfg = load_config(REPO / config, COMMON + [f"Global.output_dir={out}"] + overrides)
    module = prepare(cfg)
    return Path(Trainer(module.cfg, module).fit()["checkpoint"])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Shapes world, a VQVAE, its token shards and vocab, and a VQA set tokenized by it."""
    from ernie_vilg.data.shapes import write_shapes_dataset
    from ernie_vilg.data.shapes_vqa import make_vqa_manifest
    from ernie_vilg.text.vocab import build_vocab, build_vqa_vocab
    from ernie_vilg.vq.tokenize_images import tokenize_manifest

    root = tmp_path_factory.mktemp("stages")
    shapes = root / "shapes"
    write_shapes_dataset(shapes, num_train=16, num_val=4, num_test=4, size=32, seed=0, progress=False)
    paths = {"root": root, "shapes": shapes}
    paths["vq"] = train("configs/vq/tiny_vqvae.yaml", root / "vq", [
        f"Data.train_manifest={shapes / 'train.jsonl'}", f"Data.val_manifest={shapes / 'val.jsonl'}"])
    build_vocab([shapes / "train.jsonl", shapes / "val.jsonl"], root / "vocab.txt")
    for split in ("train", "val"):
        tokenize_manifest(paths["vq"], shapes / f"{split}.jsonl", root / "tokens" / split)
    make_vqa_manifest(shapes / "train.jsonl", root / "vqa" / "train.jsonl")
    build_vqa_vocab([root / "vqa" / "train.jsonl"], root / "vqa_vocab.txt")
    tokenize_manifest(paths["vq"], root / "vqa" / "train.jsonl", root / "vqa_tokens" / "train")
    return paths


def vilg_data(world: dict[str, Path]) -> list[str]:
    root = world["root"]
    return [f"Data.vocab_file={root / 'vocab.txt'}", f"Data.train_shards={root / 'tokens' / 'train'}",
            f"Data.val_shards={root / 'tokens' / 'val'}"]


@pytest.fixture(scope="module")
def vilg_ckpt(world) -> Path:
    return train("configs/vilg/tiny.yaml", world["root"] / "vilg", TINY_VILG + vilg_data(world))


def tool(name: str) -> Any:
    """tools/<name>.py as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_roundtrip_and_export(ckpt: Path, tmp: Path, stage: str) -> None:
    """safetensors out and back bit for bit through tools/convert_checkpoint.py (the registry's
    bare model checks the names and shapes), then tools/export.py."""
    _, cfg = load_checkpoint_config(ckpt)
    assert cfg.Global.stage == stage
    convert = tool("convert_checkpoint")
    assert convert.main(["to-safetensors", "--ckpt", str(ckpt), "--out", str(tmp / "st")]) == 0
    assert convert.main(["from-safetensors", "--in", str(tmp / "st"), "--out", str(tmp / "back")]) == 0
    back = tmp / "back"
    a, b = load_model_state(ckpt), load_model_state(back)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key].numpy(), b[key].numpy()), key
    spec = STAGES[stage]
    if spec.export is None:
        assert spec.no_export_reason
        assert tool("export").main(["--ckpt", str(ckpt), "--out", str(tmp / "export")]) == 2  # says why
        return
    from ernie_vilg.stages import export_graphs

    assert tool("export").main(["--ckpt", str(ckpt), "--out", str(tmp / "export")]) == 0
    info = json.loads((tmp / "export" / "export.json").read_text(encoding="utf-8"))
    names = [g["name"] for g in info["graphs"]]
    model = build_bare_model(cfg, ckpt)
    from ernie_vilg.checkpoint_io import set_model_state

    set_model_state(model, load_model_state(ckpt), ckpt)
    model.eval()
    graphs = export_graphs(model, cfg, 1)
    assert [g.name for g in graphs] == names[:len(graphs)]
    rng = np.random.default_rng(0)
    for graph in graphs:
        inputs = []
        for spec_in in graph.inputs:
            shape = [1 if d == -1 else d for d in spec_in["shape"]]
            if spec_in["dtype"] == "int64":
                high = cfg.Model.image_vocab_size if "image" in spec_in["name"] else cfg.Model.text_vocab_size
                if stage in ("vq", "vqgan", "dvae"):
                    high = cfg.VQ.codebook_size
                if stage == "reranker":
                    high = 8
                inputs.append(paddle.to_tensor(rng.integers(0, max(high, 1), shape).astype("int64")))
            else:
                inputs.append(paddle.to_tensor(rng.uniform(-1, 1, shape).astype("float32")))
        loaded = paddle.jit.load(str(tmp / "export" / graph.name))
        with paddle.no_grad():
            eager = graph.layer(*inputs)
            static = loaded(*inputs)
        np.testing.assert_allclose(static.numpy(), eager.numpy(), rtol=1e-4, atol=1e-4, err_msg=graph.name)


def check_tokenizer_tool(ckpt: Path, world: dict[str, Path], tmp: Path) -> None:
    """Its users: load_tokenizer and tokenize_manifest (the shards of stage 2)."""
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.vq.registry import load_tokenizer
    from ernie_vilg.vq.tokenize_images import tokenize_manifest

    tokenize_manifest(ckpt, world["shapes"] / "test.jsonl", tmp / "tokens")
    shards = TokenShards(tmp / "tokens")
    tok = load_tokenizer(ckpt)
    assert len(shards) == 4 and shards.grid == tok.grid_size(32) and shards.codebook_size == tok.codebook_size


def first_test_image(world: dict[str, Path]) -> Path:
    from ernie_vilg.data.manifest import read_manifest

    return Path(read_manifest(world["shapes"] / "test.jsonl")[0].image_path)


def check_generation_tools(ckpt: Path, world: dict[str, Path]) -> None:
    """generate (text -> image) and caption (image -> text) through the tools' functions."""
    from ernie_vilg.generation.pipelines import caption_images, text_to_image
    from ernie_vilg.pipeline import load_bundle

    bundle = load_bundle(ckpt, need_image_tokenizer=True)
    images = text_to_image(bundle, ["一个红色的圆形"], num_candidates=1, seed=0)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    captions = caption_images(bundle, [first_test_image(world)])
    assert len(captions) == 1 and isinstance(captions[0], str)


@pytest.mark.parametrize("stage, config, kind", [("vq", "configs/vq/tiny_vqvae.yaml", "vqvae"),
                                                 ("vqgan", "configs/vq/shapes_vqgan.yaml", "vqgan"),
                                                 ("dvae", "configs/vq/shapes_dvae.yaml", "dvae")])
def test_tokenizer_stages(world, tmp_path, stage, config, kind) -> None:
    shapes = world["shapes"]
    extra = {"vq": [], "vqgan": ["VQGAN.disc_start=1", "VQGAN.disc_channels=8", "VQGAN.disc_layers=2"],
             "dvae": ["DVAE.kmeans_init_batches=1", "DVAE.encoder_freeze_steps=1"]}[stage]
    ckpt = world["vq"] if stage == "vq" else train(config, tmp_path / stage, TINY_TOKENIZER + extra + [
        f"VQ.kind={kind}", f"Data.train_manifest={shapes / 'train.jsonl'}", f"Data.val_manifest={shapes / 'val.jsonl'}"])
    check_roundtrip_and_export(ckpt, tmp_path, stage)
    check_tokenizer_tool(ckpt, world, tmp_path)
    if stage == "vqgan":  # the discriminator, an extra network, is saved beside the tokenizer
        assert (ckpt / "discriminator.pdparams").is_file() and (ckpt / "discriminator.pdopt").is_file()


def test_vilg_stage(world, vilg_ckpt, tmp_path) -> None:
    check_roundtrip_and_export(vilg_ckpt, tmp_path, "vilg")
    check_generation_tools(vilg_ckpt, world)


def test_vilg_e2e_stage(world, tmp_path) -> None:
    ckpt = train("configs/vilg/shapes_e2e.yaml", tmp_path / "e2e", TINY_VILG + vilg_data(world) + [
        f"Data.tokenizer_ckpt={world['vq']}"])
    _, cfg = load_checkpoint_config(ckpt)
    assert cfg.VQ.kind == "vqvae" and cfg.Data.image_size == 32  # resolved from the tokenizer and shards
    check_roundtrip_and_export(ckpt, tmp_path, "vilg_e2e")
    check_generation_tools(ckpt, world)
    # its generated tokens become pixels through its own reconstructor (or, asked, the tokenizer's)
    from ernie_vilg.data.images import denormalize
    from ernie_vilg.generation.pipelines import decode_image_ids, encode_texts, text_to_image, text_to_image_ids
    from ernie_vilg.pipeline import load_bundle

    bundle = load_bundle(ckpt, need_image_tokenizer=True)
    assert bundle.decoder == "e2e"
    texts = ["一个红色的圆形"]
    ids = text_to_image_ids(bundle, texts, 2, seed=3)
    with paddle.no_grad():
        own = bundle.model.reconstruct_from_ids(paddle.to_tensor(np.repeat(encode_texts(bundle, texts), 2, axis=0)),
                                                paddle.to_tensor(ids.reshape([2, -1])))
    e2e = text_to_image(bundle, texts, 2, seed=3)
    assert np.array_equal(e2e, denormalize(own.numpy()))
    bundle.decoder = "tokenizer"
    assert np.array_equal(text_to_image(bundle, texts, 2, seed=3), decode_image_ids(bundle.image_tokenizer, ids))


def test_caption_finetune_stage(world, vilg_ckpt, tmp_path) -> None:
    ckpt = train("configs/finetune/shapes_caption.yaml", tmp_path / "ft", [
        "Data.batch_size=4", "Data.stream_partitions=1", "Finetune.eval_items=2", "Data.max_text_len=48",
        f"Finetune.init_from={vilg_ckpt}", f"Data.train_shards={world['root'] / 'tokens' / 'train'}",
        f"Data.val_shards={world['root'] / 'tokens' / 'val'}", "Data.vocab_file="])
    check_roundtrip_and_export(ckpt, tmp_path, "caption_finetune")
    check_generation_tools(ckpt, world)


def test_vqa_stage(world, tmp_path) -> None:
    from ernie_vilg.generation.vqa import answer_image_questions
    from ernie_vilg.pipeline import load_bundle

    root = world["root"]
    ckpt = train("configs/vilg/tiny.yaml", tmp_path / "vqa", TINY_VILG + [
        "Global.stage=vqa", f"Data.vocab_file={root / 'vqa_vocab.txt'}",
        f"Data.train_shards={root / 'vqa_tokens' / 'train'}", "Data.val_shards=", "VQA.max_question_len=24",
        "VQA.max_answer_len=8", f"Data.tokenizer_ckpt={world['vq']}"])
    check_roundtrip_and_export(ckpt, tmp_path, "vqa")
    bundle = load_bundle(ckpt, need_image_tokenizer=True)
    answers = answer_image_questions(bundle, [first_test_image(world)], ["什么颜色？"])
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_reranker_stage(world, tmp_path) -> None:
    from ernie_vilg.models.reranker import load_reranker

    shapes = world["shapes"]
    ckpt = train("configs/reranker/shapes.yaml", tmp_path / "rr", [
        f"Data.train_manifest={shapes / 'train.jsonl'}", f"Data.val_manifest={shapes / 'val.jsonl'}",
        "Data.batch_size=4", "Data.max_text_len=48", "Reranker.embed_dim=16", "Reranker.text_layers=1",
        "Reranker.text_hidden=16", "Reranker.text_heads=2", "Reranker.patch_size=4",
        "Reranker.image_channels=[8, 16]", "Reranker.pool_grid=2"])
    check_roundtrip_and_export(ckpt, tmp_path, "reranker")
    reranker = load_reranker(ckpt)
    scores = reranker.score(np.zeros((2, 3, 32, 32), dtype="float32"), ["一个红色的圆形", "两个蓝色的方形"])
    assert np.shape(scores) == (2,) and all(0.0 <= float(s) <= 1.0 for s in scores)


def test_every_registered_stage_has_a_test_here() -> None:
    tested = {"vq", "vqgan", "dvae", "vilg", "vilg_e2e", "caption_finetune", "vqa", "reranker"}
    assert set(STAGES) == tested


def test_the_end_to_end_stage_trains_the_null_conditions_of_guidance(world, tmp_path) -> None:
    """Train.cond_drop reaches the end-to-end generator as it reaches the two-stage one: with
    every condition dropped, the image-to-text stream reads the null image (its embedding gets a
    gradient), so guided sampling uses conditions the generator was trained on."""
    from ernie_vilg.training.module import StepContext

    cfg = load_config(REPO / "configs/vilg/shapes_e2e.yaml", COMMON + TINY_VILG + vilg_data(world) + [
        f"Global.output_dir={tmp_path / 'run'}", f"Data.tokenizer_ckpt={world['vq']}", "Train.cond_drop=1.0"])
    module = prepare(cfg)
    model = module.build_model()
    batch = next(iter(module.train_batches(0, 1)))
    loss, _ = module.training_step(StepContext(model, model, 0), batch)
    loss.backward()
    assert float(model.null_img_emb.grad.abs().sum()) > 0


def _e2e_step(world: dict[str, Path], tmp: Path, step: int, overrides: list[str]) -> dict[str, Any]:
    """One update of the end-to-end stage at trainer step `step` with the real optimizer: which
    parameters moved, and the step's logs."""
    from ernie_vilg.training.module import StepContext
    from ernie_vilg.training.trainer import build_optimizer

    cfg = load_config(REPO / "configs/vilg/shapes_e2e.yaml", COMMON + TINY_VILG + vilg_data(world) + [
        f"Global.output_dir={tmp}", f"Data.tokenizer_ckpt={world['vq']}", *overrides])
    module = prepare(cfg)
    model = module.build_model()
    opt = build_optimizer(model, module.cfg)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    loss, logs = module.training_step(StepContext(model, model, step), next(iter(module.train_batches(0, 1))))
    loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not np.array_equal(before[n], p.numpy())}
    return {"logs": logs, "e2e": {n for n in moved if n.startswith("e2e.mapping") or n.startswith("e2e.decoder.decoder")},
            "blocks": {n for n in moved if n.startswith("blocks.")}, "n_blocks": sum(n.startswith("blocks.") for n in before)}


def test_the_reconstructor_follows_its_own_schedule(world, tmp_path) -> None:
    """E2E.rec_lr_scale / rec_warmup_steps / rec_start_step (Table 7's reconstructor knobs) reach
    the optimizer: a zero multiplier freezes the reconstructor while the generator still learns."""
    from ernie_vilg.config import ConfigError, E2EConfig
    from ernie_vilg.stages.vilg_e2e import reconstructor_lr_scale

    e2e = E2EConfig(rec_lr_scale=0.5, rec_warmup_steps=4, rec_start_step=10)
    assert [reconstructor_lr_scale(e2e, s) for s in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5]
    assert reconstructor_lr_scale(E2EConfig(), 0) == 1.0

    default = _e2e_step(world, tmp_path / "a", 0, [])
    assert default["e2e"] and len(default["blocks"]) == default["n_blocks"] and "loss_rec" in default["logs"]
    frozen = _e2e_step(world, tmp_path / "b", 0, ["E2E.rec_lr_scale=0.0"])
    assert not frozen["e2e"] and len(frozen["blocks"]) == frozen["n_blocks"] and "loss_rec" in frozen["logs"]
    warm = _e2e_step(world, tmp_path / "c", 0, ["E2E.rec_warmup_steps=4"])  # 1/4 of the lr at step 0
    assert warm["e2e"] == default["e2e"]
    idle = _e2e_step(world, tmp_path / "d", 3, ["E2E.rec_start_step=4"])  # not started: no loss, no update
    assert not idle["e2e"] and "loss_rec" not in idle["logs"] and len(idle["blocks"]) == idle["n_blocks"]
    started = _e2e_step(world, tmp_path / "e", 4, ["E2E.rec_start_step=4"])
    assert started["e2e"] == default["e2e"] and "loss_rec" in started["logs"]
    with pytest.raises(ConfigError, match="E2E.rec_warmup_steps"):
        _e2e_step(world, tmp_path / "f", 0, ["E2E.rec_warmup_steps=-1"])
