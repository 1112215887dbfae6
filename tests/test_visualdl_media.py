"""Validation media: image grids and texts in VisualDL, grids mirrored to OUTPUT/samples/step-N.png;
read back from the VisualDL log."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_fixture import REPO, write_tiny_checkpoint
from vilg_fixture import write_tiny_vilg_data

visualdl = pytest.importorskip("visualdl", reason="VisualDL (a paddlenlp dependency) is not importable")


def _read_vdl(run: Path) -> "visualdl.LogReader":
    from visualdl import LogReader

    (log,) = sorted((run / "vdl").glob("vdlrecords.*.log"))
    return LogReader(file_path=str(log))


def _image(record) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(record.image.encoded_image_string)).convert("RGB"))


def test_vilg_validation_logs_prompt_grids_and_captions_beside_references(tmp_path) -> None:
    from ernie_vilg.config import load_config
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.trainer import Trainer

    write_tiny_checkpoint(tmp_path / "fx")  # its tiny VQ tokenizer: 16 px -> 4 x 4 tokens, codebook 32
    data = write_tiny_vilg_data(tmp_path / "data", grid=4, codebook=32)
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs/vilg/tiny.yaml", data + [
        f"Data.val_shards={tmp_path / 'data' / 'train'}", f"Data.tokenizer_ckpt={tmp_path / 'fx/vq/step-00000001'}",
        "Data.image_size=16", "Data.batch_size=8", "Train.max_steps=2", "Train.eval_every=2", "Train.save_every=0",
        "Train.eval_samples=4", "Train.progress_bar=false", f"Global.output_dir={run}", "Generation.max_text_len=6"])
    module = prepare(cfg)
    Trainer(module.cfg, module).fit()
    reader = _read_vdl(run)
    tags = reader.get_tags()
    assert "val/prompts" in tags["image"] and {"val/captions", "val/prompt_list"} <= set(tags["text"])
    (grid,) = reader.get_data("image", "val/prompts")
    assert grid.id == 2
    logged = _image(grid)
    mirrored = np.asarray(Image.open(run / "samples" / "step-2.png").convert("RGB"))
    np.testing.assert_array_equal(logged, mirrored)  # the PNG is the grid VisualDL holds
    assert logged.shape[0] < logged.shape[1]  # 2 rows (true, generated) of 8 prompts
    (captions,) = reader.get_data("text", "val/captions")
    text = captions.text.encoded_text_string
    assert text.startswith("| # | generated caption | references |") and len(text.splitlines()) == 2 + 8
    from ernie_vilg.data.token_shards import TokenShards

    first = TokenShards(tmp_path / "data" / "train")[0]
    assert first.text in text.splitlines()[2]  # row 0 holds the first item's reference


def test_vq_validation_logs_originals_over_reconstructions(tmp_path) -> None:
    from ernie_vilg.config import load_config
    from ernie_vilg.data.shapes import write_shapes_dataset
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.trainer import Trainer

    write_shapes_dataset(tmp_path / "shapes", 8, 4, 0, size=16)
    run = tmp_path / "vq"
    cfg = load_config(REPO / "configs/vq/tiny_vqvae.yaml", [
        f"Data.train_manifest={tmp_path / 'shapes/train.jsonl'}", f"Data.val_manifest={tmp_path / 'shapes/val.jsonl'}",
        "Data.image_size=16", "Train.max_steps=1", "Train.eval_every=1", "Train.progress_bar=false",
        f"Global.output_dir={run}"])
    module = prepare(cfg)
    Trainer(module.cfg, module).fit()
    (grid,) = _read_vdl(run).get_data("image", "val/reconstructions")[:1]
    pairs = _image(grid)
    np.testing.assert_array_equal(pairs, np.asarray(Image.open(run / "samples" / "step-1.png").convert("RGB")))
    # top row: the val images themselves (upscaled 16 px -> 64 px cells, 2 px gaps)
    from ernie_vilg.data.images import denormalize, load_image
    from ernie_vilg.data.manifest import read_manifest

    first = denormalize(load_image(read_manifest(tmp_path / "shapes/val.jsonl")[0].image_path, 16)[None])[0]
    cell = pairs[2:66, 2:66]
    np.testing.assert_array_equal(cell[::4, ::4], first)
    assert pairs.shape == (2 * 66 + 2, 4 * 66 + 2, 3)  # 2 rows x 4 val images
