"""The paper's Table 7 (two-stage vs end-to-end text-to-image) at shapes scale, over seeds,
resumable across sessions. The command line is `tools/ablate_e2e.py`:

    # the reconstruction ceiling of a tokenizer (gold test images -> ids -> decoder, judged)
    python tools/ablate_e2e.py tokenizer --ckpt CKPT --data DIR [--num 1000]
    # train both variants for every seed, evaluate each seed, write OUT/summary.{json,md}
    python tools/ablate_e2e.py run --data DIR --tokenizer CKPT --out OUT --seeds 0 1 2 \
        --steps 3400 --num-eval 1000 --fid-weights W [-o Section.key=value ...]
    # variants: reuse a finished run's shared part (and its two-stage generators), e.g. a longer
    # recipe, or only the end-to-end variant with other reconstructor settings
    python tools/ablate_e2e.py run ... --out OUT2 --shared-from OUT [--two-stage-from OUT] -o E2E.rec_weight=100
    # how much the generator feels the reconstruction loss (gradient norms on its weights)
    python tools/ablate_e2e.py gradients --run OUT/s0/end_to_end [--from-init]
    # only the mean / spread table of what has finished
    python tools/ablate_e2e.py summary --out OUT
    # a row's pixel-noise floor: background level, then FID after zeroing values <= 3
    python tools/ablate_e2e.py floor --images OUT/shared/row4_1000 --real OUT/shared/real_1000 \
        --real-stats OUT/shared/real_stats_1000.npz --out DIR --fid-weights W

`run` is a work list of (seed, variant) trainings and per-seed evaluations. Each item is claimed
with a lock file (OUT/locks/, holding the claimer's pid; a lock of a dead process is taken over),
so two `run` processes with the same arguments share the list, and a stopped `run` continues
where it stopped: trainings resume from their newest checkpoint (Train.save_every), finished
items are skipped (a training is finished when its newest checkpoint reached --steps; a seed's
evaluation when OUT/s<seed>/table7.json exists).

The five rows (paper sec. 3.1.3 / 5, Table 7):
    1  two-stage G + two-stage R      sampled ids of the two-stage generator -> the dVAE decoder
    2  end-to-end G + two-stage R     sampled ids of the end-to-end generator -> the dVAE decoder
    3  end-to-end G + end-to-end R    sampled ids of the end-to-end generator -> its reconstructor
    4  gold sequence + two-stage R    the test images' own ids -> the dVAE decoder
    5  gold sequence + end-to-end R   the test images' own ids -> the end-to-end reconstructor
Both generators sample with the recipe's Generation settings (top-k, classifier-free guidance
scale), one sample per test caption, with the same sampling seeds. Row 4 does not depend on the
seed (the dVAE is shared), so it is computed once. FID: every row's images against the same
real test images (Inception of metrics/fid.py); the judge: ernie_vilg/data/shapes_judge.py
against each image's caption.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROWS = ("two-stage G + two-stage R", "end-to-end G + two-stage R", "end-to-end G + end-to-end R",
        "gold sequence + two-stage R", "gold sequence + end-to-end R")
PAPER_FID = (41.4, 40.5, 39.9, 21.7, 18.6)  # Table 7, the 300M lite model with a dVAE, MS-COCO val zero-shot
VARIANTS = (("two_stage", "vilg"), ("end_to_end", "vilg_e2e"))
JUDGE_KEYS = ("shape", "colour", "position", "size", "count", "all")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "vilg" / "shapes_table7.yaml"
log = logging.getLogger(__name__)


class Table7Error(ValueError):
    """A bad input of the ablation (a folder, checkpoint or reused run that does not fit)."""


@dataclass
class Table7Run:
    """One `run` of the ablation: where the data and the two-stage reconstructor (the dVAE) are,
    where the work list lives, and what every training and evaluation uses."""

    data: Path  # shapes world folder (train / val / test.jsonl)
    tokenizer: Path  # dVAE checkpoint: the tokenizer and the two-stage reconstructor
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 3400  # training steps of each variant (equal steps, batches and seeds)
    save_every: int = 500
    num_eval: int = 1000  # test captions, one sample each; FID on as many generated vs real images
    fid_weights: Optional[Path] = None  # converted Inception weights (None: judge only)
    threads: int = 1  # threads of the evaluation
    config: Path = DEFAULT_CONFIG
    train_only: bool = False
    override: list[str] = field(default_factory=list)  # Section.key=value for both variants
    shared_from: Optional[Path] = None
    two_stage_from: Optional[Path] = None


# ---------------------------------------------------------------------------------------------
# locks: one claimer per work item, across processes and sessions

def _claim(locks: Path, name: str) -> bool:
    """Take work item `name` (OUT/locks/<name>.lock) unless a live process holds it; a lock of a
    dead process is taken over (the training output folder's lock, non-blocking)."""
    from ernie_vilg.training.checkpoint import OutputLock

    return OutputLock(locks, f"{name}.lock").try_acquire()


def _release(locks: Path, name: str) -> None:
    (locks / f"{name}.lock").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# tokenizer ceiling

def tokenizer_ceiling(ckpt: str, data: str, num: int) -> dict[str, float]:
    from ernie_vilg.vq.registry import load_tokenizer as load_image_tokenizer
    from ernie_vilg.checkpoint_io import load_checkpoint_config
    from ernie_vilg.vq.evaluate import evaluate_manifest

    _, cfg = load_checkpoint_config(ckpt)
    tok = load_image_tokenizer(ckpt)
    return evaluate_manifest(tok, Path(data) / "test.jsonl", cfg.Data.image_size, max_images=num)


def gradient_balance(run_dir: Path, num_batches: int, from_init: bool = False) -> dict[str, Any]:
    """How much the generator feels the reconstruction loss: over `num_batches` training batches,
    the gradient norms on the generator's parameters (everything but the reconstructor) of
    gen_weight * L_txt2img and of rec_weight * L_rec, their ratio and cosine. `from_init`: at the
    run's initial weights (a fresh reconstructor MLP) instead of its newest checkpoint."""
    from itertools import islice

    import paddle

    from ernie_vilg.checkpoint_io import latest_checkpoint, load_checkpoint_config, load_weights_into
    from ernie_vilg.stages import prepare

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise Table7Error(f"{run_dir}: no checkpoint")
    _, cfg = load_checkpoint_config(ckpt)
    if cfg.Global.stage != "vilg_e2e":
        raise Table7Error(f"{ckpt}: stage {cfg.Global.stage!r}, not vilg_e2e")
    module = prepare(cfg)
    model = module.build_model()
    if not from_init:
        load_weights_into(model, ckpt)
    model.train()
    gen = [p for n, p in model.named_parameters() if not n.startswith("e2e.") and not p.stop_gradient]
    w = cfg.E2E
    norms: dict[str, list[float]] = {"txt2img": [], "rec": [], "cosine": []}
    for batch in islice(iter(module.train_batches(0, 1)), num_batches):
        logits, h_img = model.txt2img_with_hidden(batch["text_ids"], batch["image_ids"])
        t2i = w.gen_weight * paddle.nn.functional.cross_entropy(
            logits.reshape([-1, logits.shape[-1]]), batch["image_ids"].reshape([-1, 1]))
        rec = w.rec_weight * model.reconstruction_loss(model.e2e(h_img), batch["images"])
        grads = {}
        for name, loss in (("txt2img", t2i), ("rec", rec)):
            g = paddle.grad([loss], gen, retain_graph=True, allow_unused=True)
            grads[name] = np.concatenate([np.zeros(int(np.prod(p.shape)), np.float32) if x is None else x.numpy().ravel()
                                          for p, x in zip(gen, g)])
        a, b = grads["txt2img"], grads["rec"]
        norms["txt2img"].append(float(np.linalg.norm(a)))
        norms["rec"].append(float(np.linalg.norm(b)))
        norms["cosine"].append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    out = {k: float(np.mean(v)) for k, v in norms.items()}
    out.update(ratio=out["rec"] / out["txt2img"], checkpoint=None if from_init else str(ckpt),
               rec_weight=w.rec_weight, gen_weight=w.gen_weight, batches=num_batches)
    return out


# ---------------------------------------------------------------------------------------------
# data, training

def _prepare(data: Path, tokenizer: Path, shared: Path, locks: Path) -> dict[str, Path]:
    from ernie_vilg.vq.tokenize_images import tokenize_manifest
    from ernie_vilg.text.vocab import build_vocab

    paths = {"vocab": shared / "vocab.txt", **{s: shared / "tokens" / s for s in ("train", "val", "test")}}
    done = shared / "prepared.json"
    while not done.is_file():
        if _claim(locks, "prepare"):
            try:
                shared.mkdir(parents=True, exist_ok=True)
                if not paths["vocab"].is_file():
                    build_vocab([data / "train.jsonl", data / "val.jsonl"], paths["vocab"])
                for split in ("train", "val", "test"):
                    if not (paths[split] / "info.json").is_file():
                        tokenize_manifest(tokenizer, data / f"{split}.jsonl", paths[split])
                done.write_text(json.dumps({"data": str(data), "tokenizer": str(tokenizer)}), encoding="utf-8")
            finally:
                _release(locks, "prepare")
        else:
            time.sleep(10)
    recorded = json.loads(done.read_text(encoding="utf-8"))
    if Path(recorded["tokenizer"]) != tokenizer:
        raise Table7Error(f"{shared} was tokenized with {recorded['tokenizer']}, not {tokenizer}: use another --out")
    return paths


def _run_config(args: Table7Run, stage: str, run_dir: Path, paths: dict[str, Path], seed: int) -> Any:
    from ernie_vilg.config import load_config

    return load_config(Path(args.config), [
        f"Global.stage={stage}", f"Global.output_dir={run_dir}", f"Global.seed={seed}",
        f"Data.train_shards={paths['train']}", f"Data.val_shards={paths['val']}",
        f"Data.vocab_file={paths['vocab']}", f"Data.tokenizer_ckpt={args.tokenizer}",
        f"Train.max_steps={args.steps}", "Train.max_minutes=0", "Train.eval_every=0",
        f"Train.save_every={args.save_every}", "Train.progress_bar=False", *args.override])


def _trained_step(run_dir: Path) -> int:
    from ernie_vilg.checkpoint_io import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        return 0
    meta = ckpt / "meta.json"
    return int(json.loads(meta.read_text(encoding="utf-8")).get("step", 0)) if meta.is_file() else 0


def _train(args: Table7Run, stage: str, run_dir: Path, paths: dict[str, Path], seed: int) -> None:
    from ernie_vilg.runtime import configure_threads, seed_everything
    from ernie_vilg.stages import prepare
    from ernie_vilg.training.trainer import Trainer

    cfg = _run_config(args, stage, run_dir, paths, seed)
    configure_threads(cfg.Global.num_threads)
    seed_everything(seed)
    t0 = time.time()
    module = prepare(cfg)
    result = Trainer(module.cfg, module).fit()
    with open(run_dir / "table7_train.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": result.get("step"), "seconds_this_leg": time.time() - t0,
                            "ended": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}) + "\n")


# ---------------------------------------------------------------------------------------------
# evaluation

def _save_pngs(images_u8: np.ndarray, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images_u8):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def _load_model(run_dir: Path, module_cls_stage: str, args: Table7Run, paths: dict[str, Path],
                seed: int) -> Any:
    from ernie_vilg.checkpoint_io import latest_checkpoint, load_weights_into
    from ernie_vilg.stages import prepare

    cfg = _run_config(args, module_cls_stage, run_dir, paths, seed)
    module = prepare(cfg)
    model = module.build_model()
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    load_weights_into(model, ckpt)
    model.eval()
    return module, model


def _generate(model: Any, module: Any, records: list[Any], seed: int, batch: int = 250) -> np.ndarray:
    """One sample per caption with the recipe's Generation settings (as the quickstart's
    one-sample judge: generation/evaluate.image_direction), seeds seed + batch start."""
    from ernie_vilg.generation.decoding import SamplingParams, TextSpecials, generate_image_tokens

    gen, tok = module.cfg.Generation, module.text_tokenizer
    params = SamplingParams(greedy=False, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    specials = TextSpecials(tok.cls_id, tok.sep_id, tok.pad_id)
    out = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        text_ids = tok.encode_batch([r.text for r in chunk], module.cfg.Data.max_text_len, pad_to_longest=True)
        out.append(generate_image_tokens(model, text_ids, params, seed=seed + start, cfg_scale=gen.cfg_scale,
                                         specials=specials))
    return np.concatenate(out)


def _e2e_reconstruct(model: Any, module: Any, records: list[Any], ids: np.ndarray, batch: int = 250) -> np.ndarray:
    import paddle

    tok = module.text_tokenizer
    out = []
    with paddle.no_grad():
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            text_ids = tok.encode_batch([r.text for r in chunk], module.cfg.Data.max_text_len, pad_to_longest=True)
            out.append(model.reconstruct_from_ids(paddle.to_tensor(text_ids),
                                                  paddle.to_tensor(ids[start:start + batch])).numpy())
    return np.concatenate(out)


def _decode(tokenizer: Any, ids: np.ndarray, batch: int = 250) -> np.ndarray:
    import paddle

    with paddle.no_grad():
        return np.concatenate([tokenizer.decode_ids(paddle.to_tensor(ids[s:s + batch])).numpy()
                               for s in range(0, len(ids), batch)])


def _score(images: np.ndarray, records: list[Any], folder: Path, real_stats: Path,
           fid_weights: Optional[Path]) -> dict[str, Any]:
    """images [N, 3, H, W] in [-1, 1] -> PNGs in folder, judge, FID vs real_stats."""
    from ernie_vilg.data.images import denormalize
    from ernie_vilg.generation.evaluate import _judge
    from ernie_vilg.metrics.fid import evaluate_fid

    u8 = denormalize(images)
    _save_pngs(u8, folder)
    judge, _ = _judge(u8, records)
    row: dict[str, Any] = {"judge": {k[len("judge_"):]: v for k, v in judge.items()}}
    row["FID"] = (evaluate_fid(folder, real_stats, weights_dir=fid_weights, progress=False)["FID"]
                  if fid_weights else None)
    return row


def _records(paths: dict[str, Path], num: int) -> list[Any]:
    from ernie_vilg.data.token_shards import TokenShards

    test = TokenShards(paths["test"])
    return [test[i] for i in range(min(num, len(test)))]


def _real_stats(args: Table7Run, paths: dict[str, Path], shared: Path, locks: Path,
                records: list[Any]) -> Path:
    """The real test images (their PNG files, at the tokenizer's size) and their FID statistics."""
    from ernie_vilg.data.images import denormalize, load_image
    from ernie_vilg.metrics.fid import evaluate_fid

    stats = shared / f"real_stats_{len(records)}.npz"
    while args.fid_weights and not stats.is_file():
        if _claim(locks, "real_stats"):
            try:
                size = int(json.loads((paths["test"] / "info.json").read_text(encoding="utf-8"))["image_size"])
                real = np.stack([load_image(r.meta["image"], size) for r in records])
                folder = shared / f"real_{len(records)}"
                _save_pngs(denormalize(real), folder)
                evaluate_fid(folder, None, weights_dir=args.fid_weights, save_stats=stats, progress=False)
            finally:
                _release(locks, "real_stats")
        else:
            time.sleep(10)
    return stats


def _gold_two_stage(args: Table7Run, paths: dict[str, Path], shared: Path, locks: Path,
                    records: list[Any], stats: Path) -> dict[str, Any]:
    """Row 4 (the same for every seed: the dVAE decoder on the gold ids)."""
    from ernie_vilg.vq.registry import load_tokenizer as load_image_tokenizer

    out = shared / f"row4_{len(records)}.json"
    while not out.is_file():
        if _claim(locks, "row4"):
            try:
                gold = np.stack([r.image_ids for r in records]).astype(np.int64)
                images = _decode(load_image_tokenizer(args.tokenizer), gold)
                row = _score(images, records, shared / f"row4_{len(records)}", stats, args.fid_weights)
                out.write_text(json.dumps(row, indent=1), encoding="utf-8")
            finally:
                _release(locks, "row4")
        else:
            time.sleep(10)
    return json.loads(out.read_text(encoding="utf-8"))


def _prep_done(args: Table7Run, shared: Path) -> bool:
    n = _num_records(args, shared)
    return (shared / f"row4_{n}.json").is_file() and (not args.fid_weights or (shared / f"real_stats_{n}.npz").is_file())


def _num_records(args: Table7Run, shared: Path) -> int:
    info = json.loads((shared / "tokens" / "test" / "info.json").read_text(encoding="utf-8"))
    return min(args.num_eval, int(info["count"]))


def _gen_seed(args: Table7Run, paths: dict[str, Path], seed: int) -> None:
    """One sample per test caption from each generator, same sampling seeds: sdir/eval/ids_*.npy."""
    import paddle

    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    sdir = args.out / f"s{seed}"
    records = _records(paths, args.num_eval)
    t0 = time.time()
    out = {}
    for variant, stage in VARIANTS:
        if variant == "two_stage" and (sdir / "eval" / "row1.json").is_file():
            continue  # reused from another run (--two-stage-from)
        module, model = _load_model(sdir / variant, stage, args, paths, seed)
        with paddle.no_grad():
            out[variant] = _generate(model, module, records, 1000 * seed)
    (sdir / "eval").mkdir(parents=True, exist_ok=True)
    for variant, ids in out.items():
        np.save(sdir / "eval" / f"ids_{variant}.npy", ids)
    (sdir / "eval" / "gen.json").write_text(json.dumps({"seconds": time.time() - t0, "num": len(records)}),
                                            encoding="utf-8")


def _row_seed(args: Table7Run, paths: dict[str, Path], shared: Path, seed: int, row: int) -> None:
    """Rows 1, 2, 3, 5 of one seed: images, judge, FID -> sdir/eval/row<i>.json."""
    from ernie_vilg.vq.registry import load_tokenizer as load_image_tokenizer
    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    sdir = args.out / f"s{seed}"
    records = _records(paths, args.num_eval)
    stats = shared / f"real_stats_{len(records)}.npz"
    t0 = time.time()
    if row in (1, 2):
        ids = np.load(sdir / "eval" / f"ids_{'two_stage' if row == 1 else 'end_to_end'}.npy")
        images = _decode(load_image_tokenizer(args.tokenizer), ids)
    else:
        module, model = _load_model(sdir / "end_to_end", "vilg_e2e", args, paths, seed)
        ids = (np.load(sdir / "eval" / "ids_end_to_end.npy") if row == 3
               else np.stack([r.image_ids for r in records]).astype(np.int64))
        images = _e2e_reconstruct(model, module, records, ids)
    result = _score(images, records, sdir / "eval" / f"row{row}", stats, args.fid_weights)
    result["seconds"] = time.time() - t0
    (sdir / "eval" / f"row{row}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")


def _finalize_seed(args: Table7Run, shared: Path, seed: int) -> None:
    sdir = args.out / f"s{seed}"
    n = _num_records(args, shared)
    rows = []
    for i, name in enumerate(ROWS):
        path = shared / f"row4_{n}.json" if i == 3 else sdir / "eval" / f"row{i + 1}.json"
        rows.append({"row": name, "paper_FID": PAPER_FID[i], **json.loads(path.read_text(encoding="utf-8"))})
    gen = json.loads((sdir / "eval" / "gen.json").read_text(encoding="utf-8"))
    summary = {"seed": seed, "rows": rows, "num_eval": n,
               "steps": {v: _trained_step(sdir / v) for v, _ in VARIANTS}, "generation_seconds": gen["seconds"],
               "fid": f"{n} generated vs {n} real test images" if args.fid_weights else None,
               "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    (sdir / "table7.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# summary

def summarize(out: Path) -> dict[str, Any]:
    tables = []
    for path in sorted(out.glob("s*/table7.json")):
        tables.append(json.loads(path.read_text(encoding="utf-8")))
    summary: dict[str, Any] = {"seeds": [t["seed"] for t in tables], "rows": []}
    if not tables:
        return summary
    for i, name in enumerate(ROWS):
        entry: dict[str, Any] = {"row": name, "paper_FID": PAPER_FID[i]}
        fids = [t["rows"][i]["FID"] for t in tables if t["rows"][i]["FID"] is not None]
        if fids:
            entry["FID"] = {"mean": float(np.mean(fids)), "std": float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0,
                            "min": float(np.min(fids)), "max": float(np.max(fids)), "values": fids}
        for k in JUDGE_KEYS:
            vals = [100.0 * t["rows"][i]["judge"][k] for t in tables]
            entry[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        "values": vals}
        summary["rows"].append(entry)
    # the paper's orderings, per seed (FID: lower is better)
    def fid(t: dict[str, Any], i: int) -> Optional[float]:
        return t["rows"][i]["FID"]

    checks = {"e2e G beats two-stage G (row 2 < row 1)": (1, 0), "e2e R beats two-stage R on generated (row 3 < row 2)": (2, 1),
              "e2e pipeline beats two-stage pipeline (row 3 < row 1)": (2, 0), "e2e R beats two-stage R on gold (row 5 < row 4)": (4, 3)}
    summary["orderings"] = {}
    for label, (a, b) in checks.items():
        diffs = [fid(t, a) - fid(t, b) for t in tables if fid(t, a) is not None and fid(t, b) is not None]
        summary["orderings"][label] = {"FID differences per seed": diffs,
                                       "holds in": f"{sum(d < 0 for d in diffs)} of {len(diffs)} seeds"}
    summary["steps"] = [t["steps"] for t in tables]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "summary.md").write_text(format_markdown(summary), encoding="utf-8")
    return summary


GRID_COLUMNS = ("real", "2s G + 2s R", "e2e G + 2s R", "e2e G + e2e R", "gold + 2s R", "gold + e2e R")


def sample_grid(out: Path, seed: int, dest: Path, num: int = 8, first: int = 0, amplify: float = 1.0,
                scale: int = 2) -> Path:
    """A PNG of `num` test captions (rows, from index `first`) x the real image and the five Table-7
    rows of one seed (columns), read from the PNGs the run saved. `amplify` multiplies every pixel
    value (clipped at 255) so a sub-visible background level shows (e.g. 40: a value of 3 of 255
    becomes 120). A column whose images were not kept (a reused row) stays blank. Also writes
    dest.txt: the captions, one per grid row."""
    from PIL import Image, ImageDraw

    from ernie_vilg.data.token_shards import TokenShards

    shared, sdir = out / "shared", out / f"s{seed}"
    if not (sdir / "table7.json").is_file():
        raise Table7Error(f"{sdir}: no evaluated seed {seed}")
    n = json.loads((sdir / "table7.json").read_text(encoding="utf-8"))["num_eval"]  # the run's, not the split's
    folders = [shared / f"real_{n}", sdir / "eval" / "row1", sdir / "eval" / "row2", sdir / "eval" / "row3",
               shared / f"row4_{n}", sdir / "eval" / "row5"]
    names = [f"{i:05d}.png" for i in range(first, min(first + num, n))]
    if not names:
        raise Table7Error(f"--first {first}: the run has {n} test images")
    probe = next((f / names[0] for f in folders if (f / names[0]).is_file()), None)
    if probe is None:
        raise Table7Error(f"{out}: none of the rows' images were kept")
    size = Image.open(probe).size[0] * scale
    header, margin = 14, 26
    grid = Image.new("RGB", (margin + len(folders) * (size + 2), header + len(names) * (size + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(GRID_COLUMNS):
        draw.text((margin + c * (size + 2) + 2, 1), label, fill=(0, 0, 0))
    for r, name in enumerate(names):
        y = header + r * (size + 2)
        draw.text((2, y + size // 2 - 5), str(first + r), fill=(0, 0, 0))
        for c, folder in enumerate(folders):
            if (folder / name).is_file():
                img = np.asarray(Image.open(folder / name).convert("RGB")).astype(np.float64) * amplify
                tile = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
                grid.paste(tile, (margin + c * (size + 2), y))
    dest.parent.mkdir(parents=True, exist_ok=True)
    grid.save(dest)
    test = TokenShards(shared / "tokens" / "test")
    dest.with_suffix(".txt").write_text("".join(f"{first + r}\t{test[first + r].text}\n" for r in range(len(names))),
                                        encoding="utf-8")
    return dest


def noise_floor(images: Path, real_dir: Path, real_stats: Path, out: Path, fid_weights: Path, max_value: int = 3,
                num_pixels_stats: int = 50) -> dict[str, Any]:
    """Diagnostic of a row's pixel-noise floor: the mean value of the row's pixels where the real
    image is black and the mean absolute difference to the real image (first `num_pixels_stats`
    images, same file names), then the row's FID after setting every value <= max_value to 0."""
    from PIL import Image

    from ernie_vilg.metrics.fid import evaluate_fid

    files = sorted(images.glob("*.png"))
    if not files:
        raise Table7Error(f"--images {images}: no PNG files")
    bg, diff = [], []
    for f in files[:num_pixels_stats]:
        a = np.asarray(Image.open(real_dir / f.name)).astype(np.float64)
        b = np.asarray(Image.open(f)).astype(np.float64)
        bg.append(b[a.sum(-1) < 30].mean())
        diff.append(np.abs(a - b).mean())
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        a = np.asarray(Image.open(f)).copy()
        a[a <= max_value] = 0
        Image.fromarray(a).save(out / f.name)
    fid = evaluate_fid(out, real_stats, weights_dir=fid_weights, progress=False)["FID"]
    return {"background_mean": float(np.mean(bg)), "mean_abs_diff": float(np.mean(diff)),
            f"FID_after_floor_{max_value}": fid}


def _ms(d: dict[str, Any], digits: int = 1) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def format_markdown(summary: dict[str, Any]) -> str:
    n = len(summary["seeds"])
    lines = [f"seeds: {summary['seeds']} (mean ± sample std over {n} seed{'s' if n != 1 else ''})", "",
             "| setting | FID (here) | paper FID | shape | colour | position | size | count | all five |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        fid = _ms(r["FID"]) if "FID" in r else "n/a"
        lines.append(f"| {r['row']} | {fid} | {r['paper_FID']} | " + " | ".join(_ms(r[k]) for k in JUDGE_KEYS) + " |")
    lines.append("")
    for label, o in summary.get("orderings", {}).items():
        diffs = ", ".join(f"{d:+.2f}" for d in o["FID differences per seed"])
        lines.append(f"- {label}: FID differences per seed {diffs}; holds in {o['holds in']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------

def _item_name(kind: str, seed: int, variant: Any) -> str:
    return {"prep": "prep", "train": f"train_s{seed}_{variant}", "gen": f"gen_s{seed}",
            "row": f"row{variant}_s{seed}"}[kind]


def _next_item(args: Table7Run, shared: Path, locks: Path) -> tuple[Optional[tuple[str, int, Any]], bool]:
    """The first claimable item in priority order, seed by seed: its two trainings, the shared
    evaluation part (real statistics, row 4), its generation, its four rows. Returns (item, wait):
    wait = an item of the current seed is blocked by one another process is running, so rather than
    start the next seed this process waits to help with the current seed's evaluation."""
    for seed in args.seeds:
        sdir = args.out / f"s{seed}"
        if (sdir / "table7.json").is_file():
            continue
        blocked = False
        trained = True
        for variant, _ in VARIANTS:
            if _trained_step(sdir / variant) < args.steps:
                trained = False
                if _claim(locks, _item_name("train", seed, variant)):
                    return ("train", seed, variant), False
        if args.train_only:
            continue
        if not _prep_done(args, shared):
            if _claim(locks, "prep"):
                return ("prep", seed, None), False
        if not trained:
            blocked = True  # the other variant is training elsewhere
        else:
            gen_done = (sdir / "eval" / "gen.json").is_file()
            if not gen_done:
                if _claim(locks, _item_name("gen", seed, None)):
                    return ("gen", seed, None), False
                blocked = True
            elif not _prep_done(args, shared):
                blocked = True
            else:
                for row in (1, 2, 3, 5):
                    if not (sdir / "eval" / f"row{row}.json").is_file():
                        if _claim(locks, _item_name("row", seed, row)):
                            return ("row", seed, row), False
                        blocked = True
        if blocked:
            return None, True
    return None, False


def _finalize_ready(args: Table7Run, shared: Path) -> None:
    for seed in args.seeds:
        sdir = args.out / f"s{seed}"
        if not (sdir / "table7.json").is_file() and (sdir / "eval" / "gen.json").is_file() and \
                _prep_done(args, shared) and all((sdir / "eval" / f"row{r}.json").is_file() for r in (1, 2, 3, 5)):
            _finalize_seed(args, shared, seed)


def _reuse(args: Table7Run) -> None:
    """--shared-from: link OUT/shared to another run's (its tokens, real statistics and row 4);
    --two-stage-from: link each seed's two-stage generator to another run's and copy its row 1, so
    only the end-to-end variant trains (the reconstructor knobs: one baseline, many variants)."""
    if args.shared_from and not (args.out / "shared").exists():
        src = Path(args.shared_from) / "shared"
        if not (src / "prepared.json").is_file():
            raise Table7Error(f"--shared-from {args.shared_from}: no prepared shared folder")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "shared").symlink_to(src.resolve())
    if not args.two_stage_from:
        return
    for seed in args.seeds:
        src, dst = Path(args.two_stage_from) / f"s{seed}", args.out / f"s{seed}"
        if _trained_step(src / "two_stage") < args.steps or not (src / "eval" / "row1.json").is_file():
            raise Table7Error(f"--two-stage-from: {src} has no two-stage run of {args.steps} steps with its row 1")
        if not (dst / "two_stage").exists():
            (dst / "eval").mkdir(parents=True, exist_ok=True)
            (dst / "two_stage").symlink_to((src / "two_stage").resolve())
            (dst / "eval" / "row1.json").write_bytes((src / "eval" / "row1.json").read_bytes())


def run_table7(args: Table7Run) -> dict[str, Any]:
    """Claim and do work items until none is left (another process may share the list); returns
    the summary of the finished seeds (also written to OUT/summary.{json,md})."""
    args.out, args.data, args.tokenizer = Path(args.out), Path(args.data), Path(args.tokenizer)
    args.fid_weights = Path(args.fid_weights) if args.fid_weights else None
    for name, path in (("data", args.data / "test.jsonl"), ("tokenizer", args.tokenizer), ("config", Path(args.config))):
        if not path.exists():
            raise Table7Error(f"{name}: {path} does not exist")
    shared, locks = args.out / "shared", args.out / "locks"
    _reuse(args)
    paths = _prepare(args.data, args.tokenizer, shared, locks)
    while True:
        item, wait = _next_item(args, shared, locks)
        if item is None:
            if not wait:
                break
            time.sleep(20)  # what is left waits for another process's item (a training, the generation)
            continue
        kind, seed, variant = item
        name = _item_name(kind, seed, variant)
        try:
            log.info("table 7: %s", name)
            if kind == "prep":
                from ernie_vilg.runtime import configure_threads

                configure_threads(args.threads)
                records = _records(paths, args.num_eval)
                _gold_two_stage(args, paths, shared, locks, records, _real_stats(args, paths, shared, locks, records))
            elif kind == "train":
                _train(args, dict(VARIANTS)[variant], args.out / f"s{seed}" / variant, paths, seed)
            elif kind == "gen":
                _gen_seed(args, paths, seed)
            else:
                _row_seed(args, paths, shared, seed, int(variant))
        finally:
            _release(locks, name)
        _finalize_ready(args, shared)
        summarize(args.out)
    return summarize(args.out)
