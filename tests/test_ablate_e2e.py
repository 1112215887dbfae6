"""tools/ablate_e2e.py (Table 7's runner, experiments/table7.py) with a tiny budget: both variants
train, all five rows come out per seed and in the summary, a second run resumes instead of
retraining, a variant reuses a baseline's two-stage generator, bad inputs exit with code 2."""
from __future__ import annotations

import json
import math

import pytest

from ernie_vilg.config import Config, VQConfig
from ernie_vilg.experiments.table7 import ROWS
from ernie_vilg.stages.dvae import DVAETrainModule
from ernie_vilg.training.trainer import Trainer
from shapes32_fixture import shapes_dir  # noqa: F401  (fixture)
from tools_ablate import main

TINY = ["-o", "Model.hidden_size=32", "-o", "Model.num_layers=2", "-o", "Data.batch_size=4",
        "-o", "Optimizer.warmup_steps=0", "-o", "Train.log_every=1"]


@pytest.fixture(scope="module")
def dvae_ckpt(tmp_path_factory, shapes_dir):  # noqa: F811
    cfg = Config()
    cfg.Global.stage, cfg.Global.output_dir = "dvae", str(tmp_path_factory.mktemp("t7") / "dvae")
    cfg.VQ = VQConfig(kind="dvae", hidden_channels=8, channel_mult=[1, 2], num_res_blocks=1, downsample_factor=8,
                      patch_size=4, codebook_size=16, embed_dim=8)
    cfg.Data.train_manifest, cfg.Data.image_size, cfg.Data.batch_size = str(shapes_dir / "train.jsonl"), 32, 4
    cfg.Train.max_steps, cfg.Train.progress_bar = 1, False
    return Trainer(cfg, DVAETrainModule(cfg)).fit()["checkpoint"]


def _run(shapes_dir, dvae_ckpt, out, *extra):  # noqa: F811
    return main(["run", "--data", str(shapes_dir), "--tokenizer", str(dvae_ckpt), "--out", str(out), "--seeds", "0",
                 "--steps", "2", "--save-every", "2", "--num-eval", "4", *TINY, *extra])


def test_ablation_rows_resume_and_reuse(tmp_path, shapes_dir, dvae_ckpt, capsys):  # noqa: F811
    out = tmp_path / "abl"
    assert _run(shapes_dir, dvae_ckpt, out) == 0
    printed = capsys.readouterr().out
    for row in ROWS:
        assert row in printed
    table = json.loads((out / "s0" / "table7.json").read_text(encoding="utf-8"))
    assert [r["row"] for r in table["rows"]] == list(ROWS)
    assert table["steps"] == {"two_stage": 2, "end_to_end": 2}
    assert all(0.0 <= r["judge"]["all"] <= 1.0 and r["FID"] is None for r in table["rows"])  # no FID weights given
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["seeds"] == [0] and len(summary["rows"]) == 5

    # the grid: captions x (real, five rows); --amplify brightens every tile but keeps black black
    from PIL import Image
    import numpy as np

    assert main(["grid", "--out", str(out), "--dest", str(tmp_path / "g.png"), "--num", "3"]) == 0
    assert main(["grid", "--out", str(out), "--dest", str(tmp_path / "g40.png"), "--num", "3", "--amplify", "40"]) == 0
    g, g40 = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("g.png", "g40.png"))
    assert g.shape == g40.shape and g.shape[0] > 3 * 64 and g.shape[1] > 6 * 64  # 3 rows x 6 columns of 64 px tiles
    assert (g40 >= g).all() and (g40 > g).any() and ((g == 0) == (g40 == 0)).all()
    assert len((tmp_path / "g.txt").read_text(encoding="utf-8").splitlines()) == 3
    assert main(["grid", "--out", str(out), "--dest", str(tmp_path / "x.png"), "--first", "99"]) == 2

    # a second run finds everything done: nothing retrained, the table unchanged
    ckpts = sorted((out / "s0").glob("*/checkpoints/step-*/meta.json"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    assert _run(shapes_dir, dvae_ckpt, out) == 0
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps
    assert json.loads((out / "s0" / "table7.json").read_text(encoding="utf-8")) == table

    # a variant: only the end-to-end generator trains (with its own setting); row 1 is the baseline's
    var = tmp_path / "var"
    assert _run(shapes_dir, dvae_ckpt, var, "--shared-from", str(out), "--two-stage-from", str(out),
                "-o", "E2E.rec_weight=5.0") == 0
    assert (var / "s0" / "two_stage").is_symlink() and not (var / "s0" / "eval" / "ids_two_stage.npy").exists()
    vt = json.loads((var / "s0" / "table7.json").read_text(encoding="utf-8"))
    assert vt["rows"][0] == table["rows"][0] and vt["rows"][3] == table["rows"][3]
    from ernie_vilg.checkpoint_io import load_checkpoint_config

    _, cfg = load_checkpoint_config(next((var / "s0" / "end_to_end" / "checkpoints").glob("step-*")))
    assert cfg.E2E.rec_weight == 5.0

    # the gradient balance of the end-to-end run: both gradients exist and are finite
    capsys.readouterr()
    assert main(["gradients", "--run", str(out / "s0" / "end_to_end"), "--batches", "1"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert g["txt2img"] > 0 and g["rec"] > 0 and math.isfinite(g["ratio"]) and -1.0 <= g["cosine"] <= 1.0
    assert main(["gradients", "--run", str(out / "s0" / "two_stage")]) == 2  # not an end-to-end run


def test_bad_inputs_exit_2(tmp_path, shapes_dir, dvae_ckpt, capsys):  # noqa: F811
    assert main(["run", "--data", str(tmp_path / "nowhere"), "--tokenizer", str(dvae_ckpt),
                 "--out", str(tmp_path / "o")]) == 2
    assert "data" in capsys.readouterr().err
    assert _run(shapes_dir, dvae_ckpt, tmp_path / "o2", "--two-stage-from", str(tmp_path / "nothing")) == 2
    assert "--two-stage-from" in capsys.readouterr().err
    assert main(["summary", "--out", str(tmp_path / "missing")]) == 2
