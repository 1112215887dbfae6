"""Data.num_workers: the tokenizer stages decode images in worker processes (data/image_workers.py),
and the batches, the skipped-image count and the resume state are those of one process."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ernie_vilg.config import ConfigError, load_config
from ernie_vilg.data.images import ImageBatches
from ernie_vilg.stages.vq import ImageTokenizerStage


@pytest.fixture
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (12 + i, 10, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": str(i)})
    (tmp_path / "3.png").write_bytes(b"not an image")  # a bad file and a missing one: skipped and counted
    lines.append({"image": "missing.png", "text": "x"})
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def take(batches: ImageBatches, n: int) -> list[dict]:
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_worker_processes_give_the_same_batches_and_state(manifest):
    plain = ImageBatches(manifest, 8, batch_size=4, seed=3)
    pooled = ImageBatches(manifest, 8, batch_size=4, seed=3, num_workers=2)
    try:
        a, b = take(plain, 5), take(pooled, 5)  # 20 images: crosses two epochs of 8 good ones
        for x, y in zip(a, b):
            assert x["paths"] == y["paths"]
            np.testing.assert_array_equal(x["images"], y["images"])
        assert plain.skipped == pooled.skipped > 0
        assert plain.state_dict() == pooled.state_dict()
        # resuming a pooled iterator from a saved state continues exactly
        state = pooled.state_dict()
        more = take(plain, 2)
        again = ImageBatches(manifest, 8, batch_size=4, seed=3, num_workers=2)
        again.set_state_dict(state)
        assert [r["paths"] for r in take(again, 2)] == [r["paths"] for r in more]
        again.close()
    finally:
        pooled.close()


def test_tokenizer_stages_read_data_num_workers(manifest):
    cfg = load_config(None, [f"Data.train_manifest={manifest}", "Data.num_workers=3", "Data.image_size=8"])
    batches = ImageTokenizerStage.train_batches(SimpleNamespace(cfg=cfg, name="vq"), 0, 1)
    assert batches.num_workers == 3
    with pytest.raises(ConfigError, match="Data.num_workers"):
        load_config(None, ["Data.num_workers=-1"])
    with pytest.raises(ValueError, match="num_workers"):
        ImageBatches(manifest, 8, batch_size=2, num_workers=-1)
