"""`judge_gold_reconstructions` and benchmarks/tokenizer_ceiling.py on stub tokenizers whose
decode is known: a lookup table of true images (gold must be judged right) and broken variants
(a decode that shows another scene, or a blank image, must be judged wrong)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from ernie_vilg.data.images import normalize
from ernie_vilg.data.shapes import make_item
from ernie_vilg.vq.base import ImageTokenizer
from ernie_vilg.vq.evaluate import judge_gold_reconstructions

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # the judge is exact on clean 64 px renders (docs/shapes.md)
KEYS = ("shape", "colour", "position", "size", "count", "all")


class TableTokenizer(ImageTokenizer):
    """A 1 x 1 token grid; id i decodes to table[(i + shift) % N] (shift 0 = an exact decode)."""

    def __init__(self, images: np.ndarray, shift: int = 0, blank: bool = False) -> None:
        super().__init__()
        self.table = images  # [N, 3, S, S] in [-1, 1]
        self.shift, self.blank = shift, blank

    @property
    def codebook_size(self) -> int:
        return len(self.table)

    @property
    def downsample_factor(self) -> int:
        return self.table.shape[-1]

    def _decode_ids(self, ids: paddle.Tensor) -> paddle.Tensor:
        rows = (ids.numpy()[:, 0, 0] + self.shift) % len(self.table)
        out = self.table[rows]
        if self.blank:
            out = np.full_like(out, -1.0)  # the black background only
        return paddle.to_tensor(out)


@pytest.fixture(scope="module")
def items() -> tuple[np.ndarray, list[dict], list[str]]:
    pairs = [make_item(0, "test", i, size=SIZE) for i in range(12)]
    images = np.stack([normalize(img) for img, _ in pairs]).astype(np.float32)
    return images, [rec["attrs"] for _, rec in pairs], [rec["text"] for _, rec in pairs]


def _ids(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64).reshape(n, 1, 1)


def test_exact_decode_is_judged_right_against_attrs_and_captions(items):
    images, attrs, texts = items
    tok = TableTokenizer(images)
    for claims in (attrs, texts):
        acc = judge_gold_reconstructions(tok, _ids(len(images)), claims)
        assert {f"judge_gold_{k}" for k in KEYS} <= set(acc)
        assert all(k.startswith("judge_gold_") for k in acc)
        for k in KEYS:
            assert acc[f"judge_gold_{k}"] == 1.0, (k, acc)
        assert acc["judge_gold_n"] == len(images)


def test_broken_decodes_fail(items):
    images, attrs, _ = items
    # another scene's image for every id: colours / shapes / cells disagree almost always
    shifted = judge_gold_reconstructions(TableTokenizer(images, shift=1), _ids(len(images)), attrs)
    assert shifted["judge_gold_all"] <= 0.25, shifted
    assert shifted["judge_gold_position"] < 1.0
    blank = judge_gold_reconstructions(TableTokenizer(images, blank=True), _ids(len(images)), attrs)
    for k in KEYS:
        assert blank[f"judge_gold_{k}"] == 0.0, (k, blank)


def test_bad_input_is_refused(items):
    images, attrs, _ = items
    tok = TableTokenizer(images)
    with pytest.raises(ValueError, match="token grids but"):
        judge_gold_reconstructions(tok, _ids(3), attrs)
    with pytest.raises(ValueError, match="codebook"):
        judge_gold_reconstructions(tok, _ids(len(images)) + 100, attrs)
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        judge_gold_reconstructions(tok, np.zeros((len(images), 1), dtype=np.int64), attrs)


def test_ceiling_script_on_a_trained_tiny_tokenizer(tmp_path):
    """The script end to end: encode a manifest with a (barely trained) tokenizer, write JSON."""
    spec = importlib.util.spec_from_file_location("tokenizer_ceiling", REPO / "benchmarks" / "tokenizer_ceiling.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from ernie_vilg.config import load_config
    from ernie_vilg.data.shapes import write_shapes_dataset
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.trainer import Trainer

    data = tmp_path / "data"
    write_shapes_dataset(data, 16, 4, 6, size=32, seed=0)
    cfg = load_config(REPO / "configs" / "vq" / "tiny_vqvae.yaml", [
        f"Global.output_dir={tmp_path / 'vq'}", f"Data.train_manifest={data / 'train.jsonl'}",
        f"Data.val_manifest={data / 'val.jsonl'}", "Data.image_size=32", "Train.max_steps=2",
        "Train.progress_bar=false",
    ])
    module = prepare(cfg)
    Trainer(module.cfg, module).fit()
    ckpt = sorted((tmp_path / "vq" / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "ceiling.json"
    assert script.main(["--ckpt", str(ckpt), "--manifest", str(data / "test.jsonl"), "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["judge_gold_n"] == 6
    for k in KEYS:
        assert 0.0 <= report[f"judge_gold_{k}"] <= 1.0
    assert "shape_confusion" in report["breakdown"]
