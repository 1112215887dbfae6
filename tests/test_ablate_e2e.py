"""tools/ablate_e2e.py with a tiny budget: both variants train, all five Table-7 rows come out."""
from __future__ import annotations


from ernie_vilg.config import Config, VQConfig
from ernie_vilg.training.trainer import Trainer
from ernie_vilg.stages.dvae import DVAETrainModule
from shapes32_fixture import shapes_dir  # noqa: F401  (fixture)


def test_ablation_prints_all_five_rows(tmp_path, shapes_dir, capsys):
    cfg = Config()
    cfg.Global.stage, cfg.Global.output_dir = "dvae", str(tmp_path / "dvae")
    cfg.VQ = VQConfig(kind="dvae", hidden_channels=8, channel_mult=[1, 2], num_res_blocks=1, downsample_factor=8,
                      patch_size=4, codebook_size=16, embed_dim=8)
    cfg.Data.train_manifest, cfg.Data.image_size, cfg.Data.batch_size = str(shapes_dir / "train.jsonl"), 32, 4
    cfg.Train.max_steps, cfg.Train.progress_bar = 1, False
    tok_ckpt = Trainer(cfg, DVAETrainModule(cfg)).fit()["checkpoint"]

    from tools_ablate import main  # noqa: E402

    rc = main(["--shapes", str(shapes_dir), "--tokenizer", tok_ckpt, "--out", str(tmp_path / "abl"), "--steps", "2",
               "--num-eval", "4", "-o", "Model.hidden_size=32", "-o", "Model.num_layers=2", "-o", "Data.batch_size=4",
               "-o", "Optimizer.warmup_steps=0"])
    assert rc == 0
    out = capsys.readouterr().out
    for row in ("two-stage G + two-stage R", "end-to-end G + two-stage R", "end-to-end G + end-to-end R",
                "gold sequence + two-stage R", "gold sequence + end-to-end R"):
        assert row in out
    assert (tmp_path / "abl" / "table7.json").is_file()
