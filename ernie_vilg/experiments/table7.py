"""The paper's Table 7 at shapes scale: two-stage vs end-to-end text-to-image, five rows.

    1  two-stage G + two-stage R      sampled ids of the two-stage model -> tokenizer decoder
    2  end-to-end G + two-stage R     sampled ids of the end-to-end model -> tokenizer decoder
    3  end-to-end G + end-to-end R    sampled ids of the end-to-end model -> its reconstructor
    4  gold sequence + two-stage R    the test images' own ids -> tokenizer decoder
    5  gold sequence + end-to-end R   the test images' own ids -> end-to-end reconstructor

Both generators are trained from the same seed with the same config, steps and batches (stage
`vilg` vs `vilg_e2e`; the end-to-end step is costlier, so a wall-time cap applies to each run).
Each row's images are scored against the real test images with FID (the Inception network of
`metrics/fid.py`; with a few hundred images this is a small-sample FID, biased upwards, usable
only to compare rows of the same run) and with the shapes judge (accuracy of shape, colour,
position, size, count against the caption; `judge_all` = every claim right).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paddle

from ernie_vilg.config import Config, load_config

log = logging.getLogger(__name__)
ROWS = ("two-stage G + two-stage R", "end-to-end G + two-stage R", "end-to-end G + end-to-end R",
        "gold sequence + two-stage R", "gold sequence + end-to-end R")
PAPER_FID = (41.4, 40.5, 39.9, 21.7, 18.6)  # Table 7, lite model with dVAE


def _prepare_data(shapes_dir: Path, tokenizer_ckpt: Path, out: Path) -> dict[str, Path]:
    from ernie_vilg.vq.tokenize_images import tokenize_manifest
    from ernie_vilg.text.vocab import build_vocab

    paths = {"vocab": out / "vocab.txt"}
    if not paths["vocab"].is_file():
        build_vocab([shapes_dir / "train.jsonl", shapes_dir / "val.jsonl"], paths["vocab"])
    for split in ("train", "val", "test"):
        paths[split] = out / "tokens" / split
        if not (paths[split] / "info.json").is_file():
            tokenize_manifest(tokenizer_ckpt, shapes_dir / f"{split}.jsonl", paths[split])
    return paths


def _config(base_config: Path, stage: str, out: Path, paths: dict[str, Path], tokenizer_ckpt: Path,
            steps: int, minutes: float, overrides: list[str]) -> Config:
    return load_config(base_config, [
        f"Global.stage={stage}", f"Global.output_dir={out}", f"Data.train_shards={paths['train']}",
        f"Data.val_shards={paths['val']}", f"Data.vocab_file={paths['vocab']}",
        f"Data.tokenizer_ckpt={tokenizer_ckpt}", f"Train.max_steps={steps}", f"Train.max_minutes={minutes}",
        "Train.eval_every=0", "Train.save_every=0", "Train.progress_bar=False", "Train.eval_samples=16",
        *overrides])


def _train(cfg: Config) -> dict[str, Any]:
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.trainer import Trainer

    module = prepare(cfg)
    result = Trainer(module.cfg, module).fit()
    return {"module": module, "result": result}


def _save_pngs(images: np.ndarray, folder: Path) -> None:
    from PIL import Image

    from ernie_vilg.data.images import denormalize

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(denormalize(images)):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def _judge(images: np.ndarray, texts: list[str], attrs: list[Any]) -> dict[str, float]:
    from ernie_vilg.data.images import denormalize
    from ernie_vilg.data.shapes_judge import judge_accuracy, judge_image

    results = []
    for img, text, attr in zip(denormalize(images), texts, attrs):
        try:
            results.append(judge_image(img, text))
        except ValueError:
            results.append(judge_image(img, attr))
    return {k: float(v) for k, v in judge_accuracy(results).items() if k != "n"}


def run_ablation(shapes_dir: str | Path, tokenizer_ckpt: str | Path, out: str | Path, steps: int,
                 minutes: float = 0.0, num_eval: int = 100, base_config: str | Path = "configs/vilg/shapes.yaml",
                 fid_weights: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                 seed: int = 0) -> dict[str, Any]:
    """Train both variants, produce the five rows, score them; returns (and writes) the table."""
    from ernie_vilg.generation.decoding import generate_image_tokens
    from ernie_vilg.generation.pipelines import image_sampling_params
    from ernie_vilg.metrics.fid import WEIGHTS_FILE, evaluate_fid
    from ernie_vilg.vq.registry import load_tokenizer

    shapes_dir, tokenizer_ckpt, out = Path(shapes_dir), Path(tokenizer_ckpt), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _prepare_data(shapes_dir, tokenizer_ckpt, out)
    runs = {}
    for name, stage in (("two_stage", "vilg"), ("end_to_end", "vilg_e2e")):
        cfg = _config(Path(base_config), stage, out / name, paths, tokenizer_ckpt, steps, minutes, overrides or [])
        runs[name] = _train(cfg)
    two_stage, e2e = runs["two_stage"]["module"], runs["end_to_end"]["module"]
    g2, ge = runs["two_stage"]["result"], runs["end_to_end"]["result"]
    # the trained weights are the Trainer's final state; rebuild and load to get eval-mode models
    from ernie_vilg.checkpoint_io import load_weights_into

    model_2s, model_e2e = two_stage.build_model(), e2e.build_model()
    for model, res in ((model_2s, g2), (model_e2e, ge)):
        ckpt = Path(res["checkpoint"])
        load_weights_into(model, ckpt)
        model.eval()
    tokenizer = load_tokenizer(tokenizer_ckpt)

    from ernie_vilg.data.images import load_image
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.text.tokenizer import pad_ids

    test = TokenShards(paths["test"])
    records = [test[i] for i in range(min(num_eval, len(test)))]
    texts = [r.text for r in records]
    tok = two_stage.text_tokenizer
    text_ids = pad_ids([tok.encode(t, two_stage.cfg.Data.max_text_len) for t in texts],
                       max(len(tok.encode(t, two_stage.cfg.Data.max_text_len)) for t in texts), tok.pad_id)
    gold = np.stack([r.image_ids for r in records]).astype(np.int64)
    params = image_sampling_params(two_stage.cfg.Generation)
    rows_images: list[np.ndarray] = []
    with paddle.no_grad():
        ids_2s = generate_image_tokens(model_2s, text_ids, params, seed=seed)
        ids_e2e = generate_image_tokens(model_e2e, text_ids, params, seed=seed)
        t = paddle.to_tensor(text_ids)

        def two_stage_r(ids: np.ndarray) -> np.ndarray:
            return tokenizer.decode_ids(paddle.to_tensor(ids)).numpy()

        def e2e_r(ids: np.ndarray) -> np.ndarray:
            return model_e2e.reconstruct_from_ids(t, paddle.to_tensor(ids)).numpy()

        rows_images = [two_stage_r(ids_2s), two_stage_r(ids_e2e), e2e_r(ids_e2e), two_stage_r(gold), e2e_r(gold)]
    real = np.stack([load_image(r.meta["image"], rows_images[0].shape[-1]) for r in records])
    real_dir = out / "eval" / "real"
    shutil.rmtree(out / "eval", ignore_errors=True)
    _save_pngs(real, real_dir)
    weights = Path(fid_weights) if fid_weights else None
    fid_ok = weights is not None and (weights / WEIGHTS_FILE).is_file()
    real_stats = out / "eval" / "real_stats.npz"
    if fid_ok:  # the reference statistics once, not once per row
        evaluate_fid(real_dir, None, weights_dir=weights, save_stats=real_stats, progress=False)
    table = []
    for i, (name, images) in enumerate(zip(ROWS, rows_images)):
        folder = out / "eval" / f"row{i + 1}"
        _save_pngs(images, folder)
        row = {"row": name, "paper_FID": PAPER_FID[i],
               "judge": _judge(images, texts, [r.meta.get("attrs") for r in records])}
        row["FID"] = evaluate_fid(folder, real_stats, weights_dir=weights, progress=False)["FID"] if fid_ok else None
        table.append(row)
    summary = {"rows": table, "num_eval": len(records), "steps": {"two_stage": g2["step"], "end_to_end": ge["step"]},
               "seconds": {"two_stage": g2["seconds"], "end_to_end": ge["seconds"]},
               "fid": "small-sample FID vs the real test images" if fid_ok else
                      "no FID weights given: FID not computed (judge accuracy only)"}
    (out / "table7.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"Table 7 at shapes scale ({summary['num_eval']} test captions; {summary['fid']})",
             f"{'setting':32s} {'FID':>8s} {'paper FID':>10s} {'judge_all':>10s} {'shape':>7s} {'colour':>7s}"]
    for r in summary["rows"]:
        fid = f"{r['FID']:.2f}" if r["FID"] is not None else "n/a"
        j = r["judge"]
        lines.append(f"{r['row']:32s} {fid:>8s} {r['paper_FID']:>10.1f} {j.get('all', 0):>10.3f} "
                     f"{j.get('shape', 0):>7.3f} {j.get('colour', 0):>7.3f}")
    return "\n".join(lines)
