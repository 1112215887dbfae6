"""Both directions on held-out token shards: captions scored with the caption metrics (character
level), generated images judged with the shapes judge (when the items carry shapes captions).

`evaluate_model` serves periodic validation (a few items); `evaluate_both_directions` is the
quickstart's final evaluation of a checkpoint folder (writes captions.jsonl, judgements, upscaled
grids and samples/index.html, the page for a person; adds the tokenizer's ceiling `judge_gold_*`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ernie_vilg.config import Config
from ernie_vilg.generation.captions import decode_captions, references, score_caption_dicts
from ernie_vilg.generation.decoding import SamplingParams, TextSpecials, generate_image_tokens
from ernie_vilg.models.transformer import ErnieViLG

log = logging.getLogger(__name__)


def _judge(images: np.ndarray, records: list[Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Judge each image against the caption it was generated from (attrs if the caption does not parse)."""
    from ernie_vilg.data.shapes_judge import judge_accuracy, judge_image

    results, rows = [], []
    for index, (img, rec) in enumerate(zip(images, records)):
        claim = _claim(rec)
        if claim is None:
            continue
        res = judge_image(img, claim)
        results.append(res)
        # `index` keys the row to its record (unjudgeable records leave gaps); the counts say
        # why count_ok failed
        rows.append({"index": index, "text": rec.text,
                     **{k: v for k, v in res.to_dict().items() if k.endswith("_ok") or k.endswith("_count")}})
    acc = judge_accuracy(results)
    metrics = {f"judge_{k}": float(v) for k, v in acc.items()}
    # image-level accuracy by the number of objects the caption names: multi-object scenes are
    # where attribute binding fails (docs/benchmarks.md, "Quickstart (session 7)")
    by_count: dict[int, list[Any]] = {}
    for res, row in zip(results, rows):
        by_count.setdefault(int(row["claimed_count"]), []).append(res)
    for count, group in sorted(by_count.items()):
        for key, value in judge_accuracy(group).items():
            if not key.startswith("object_"):
                metrics[f"judge_objects{count}_{key}"] = float(value)
    return metrics, rows


def _claim(rec: Any) -> Optional[Any]:
    """What the judge checks an image of `rec` against: its caption, or its ground-truth attrs when
    the caption is outside the shapes grammar; None when neither applies."""
    from ernie_vilg.data.shapes import parse_caption

    try:
        parse_caption(rec.text)
        return rec.text
    except ValueError:
        return rec.meta.get("attrs")


def _is_shapes(records: list[Any]) -> bool:
    try:
        from ernie_vilg.data.shapes import parse_caption

        parse_caption(records[0].text)
        return True
    except (ImportError, ValueError, IndexError):
        return False


def caption_direction(model: ErnieViLG, text_tokenizer: Any, records: list[Any], cfg: Config,
                      batch_size: int = 32, with_meteor: bool = False, cfg_scale: Optional[float] = None
                      ) -> tuple[dict[str, float], dict[str, Any]]:
    """Greedy captions for the records' image ids, scored (`caption_*`); outputs `captions` and
    `references` ({index: ...}). `cfg_scale`: guidance (default Generation.caption_cfg_scale)."""
    ids = np.stack([r.image_ids for r in records]).astype(np.int64)
    captions = decode_captions(model, text_tokenizer, ids, cfg.Generation, "greedy", batch_size, cfg_scale=cfg_scale)
    preds = {str(i): c for i, c in enumerate(captions)}
    refs = {str(i): references(rec) for i, rec in enumerate(records)}
    return score_caption_dicts(preds, refs, with_meteor), {"captions": preds, "references": refs}


def image_direction(model: ErnieViLG, text_tokenizer: Any, image_tokenizer: Any, records: list[Any], cfg: Config,
                    seed: int = 0, num_candidates: int = 1, sample_batch: int = 256, progress: bool = False,
                    cfg_scale: Optional[float] = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Sampled images for the records' texts (Generation's temperature / top-k / top-p, guidance
    `cfg_scale`, default Generation.cfg_scale), judged with the shapes judge when the texts are
    shapes captions. Best-of-N as described in `run_both_directions`. Outputs `images` (and
    `images_best`, `judgements`, `judgements_best`)."""
    from ernie_vilg.generation.best_of_n import caption_log_likelihood
    from ernie_vilg.generation.pipelines import decode_image_ids

    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    gen = cfg.Generation
    scale = gen.cfg_scale if cfg_scale is None else cfg_scale
    specials = TextSpecials(text_tokenizer.cls_id, text_tokenizer.sep_id, text_tokenizer.pad_id)
    n = num_candidates
    params = SamplingParams(greedy=False, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    first, best = [], []
    # texts x candidates sampled together: wide batches spread the per-token overhead of
    # incremental decoding (100 texts x 8 here: 217 s in batches of 256 vs 258 s of 32)
    text_batch = max(1, sample_batch // n)
    starts = range(0, len(records), text_batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"text-to-image x{n}", unit="batch")
    for start in starts:
        chunk = records[start:start + text_batch]
        text_ids = text_tokenizer.encode_batch([r.text for r in chunk], cfg.Data.max_text_len,
                                               pad_to_longest=True)
        ids = generate_image_tokens(model, text_ids, params, num_candidates=n, seed=seed + start,
                                    cfg_scale=scale, specials=specials)
        if n > 1:
            loglik = caption_log_likelihood(model, ids, np.repeat(text_ids, n, axis=0), text_tokenizer.pad_id)
            pick = loglik.reshape(len(chunk), n).argmax(axis=1)
            grids = ids.reshape(len(chunk), n, *ids.shape[1:])
            best.append(decode_image_ids(image_tokenizer, grids[np.arange(len(chunk)), pick]))
            ids = grids[:, 0]
        first.append(decode_image_ids(image_tokenizer, ids))
    metrics: dict[str, float] = {}
    outputs: dict[str, Any] = {"images": np.concatenate(first)}
    if best:
        outputs["images_best"] = np.concatenate(best)
    if _is_shapes(records):
        judge, rows = _judge(outputs["images"], records)
        metrics.update(judge)
        outputs["judgements"] = rows
        if best:
            judge, rows = _judge(outputs["images_best"], records)
            metrics.update({k.replace("judge_", f"judge_best_of_{n}_", 1): v for k, v in judge.items()})
            outputs["judgements_best"] = rows
    return metrics, outputs


def run_both_directions(model: ErnieViLG, text_tokenizer: Any, image_tokenizer: Optional[Any], records: list[Any],
                        cfg: Config, seed: int = 0, batch_size: int = 32, with_meteor: bool = False,
                        num_candidates: int = 1, sample_batch: int = 256, progress: bool = False,
                        cfg_scale: Optional[float] = None, caption_cfg_scale: Optional[float] = None
                        ) -> tuple[dict[str, float], dict[str, Any]]:
    """Greedy captions for the records' image ids and sampled images for the records' texts.

    With `num_candidates` N > 1 each text gets N samples, ranked by the model's own caption
    log-likelihood of each image (best-of-N, paper sec. 4.2, which re-ranks too): `judge_*` then
    scores the first candidate (what a single sample gives) and `judge_best_of_N_*` the top-ranked
    one, on the same samples, so the two rows differ by the ranking alone.
    Guidance scales default to Generation.cfg_scale (images) and Generation.caption_cfg_scale."""
    metrics, outputs = caption_direction(model, text_tokenizer, records, cfg, batch_size, with_meteor,
                                         caption_cfg_scale)
    if image_tokenizer is not None:
        image_metrics, image_outputs = image_direction(model, text_tokenizer, image_tokenizer, records, cfg, seed,
                                                       num_candidates, sample_batch, progress, cfg_scale)
        metrics.update(image_metrics)
        outputs.update(image_outputs)
    return metrics, outputs


def evaluate_model(model: ErnieViLG, text_tokenizer: Any, image_tokenizer: Optional[Any], shards: Any,
                   max_items: int, cfg: Config, seed: int = 0) -> dict[str, float]:
    """Periodic validation on the first `max_items` items of `shards` (model in eval mode)."""
    records = [shards[i] for i in range(min(max_items, len(shards)))]
    metrics, _ = run_both_directions(model, text_tokenizer, image_tokenizer, records, cfg, seed)
    return metrics


GRID_ITEMS = 64  # items in samples/grid*.png
MIN_CELL = 128  # px: grids and page images are upscaled (nearest neighbour) to at least this


def resolve_record_image(image: Optional[str], manifest: Optional[str]) -> Optional[Path]:
    """The file of a token record's `meta["image"]`, or None. tokenize_manifest stores the path
    as `<manifest dir>/<image>` spelt from the cwd of that run (absolute only if the manifest
    path was), so a relative path is tried as stored, then under the manifest's folder with its
    leading parts dropped one by one (the shards' info.json records the resolved manifest)."""
    if not image:
        return None
    path = Path(image)
    candidates = [path]
    if not path.is_absolute() and manifest:
        base = Path(manifest).parent
        candidates += [base / Path(*path.parts[k:]) for k in range(len(path.parts))]
    return next((c for c in candidates if c.is_file()), None)


def true_images(records: list[Any], manifest: Optional[str], image_tokenizer: Optional[Any], size: int
                ) -> tuple[list[Optional[np.ndarray]], list[str], int]:
    """uint8 [size, size, 3] true images of `records` (center crop + resize, as the tokenizer saw
    them), their labels, and how many files were missing. A missing or unreadable file falls back
    to the record's gold tokens decoded by `image_tokenizer` ("gold tokens, decoded"), or None
    without a tokenizer: the final evaluation must not die over one lost image."""
    from ernie_vilg.data.images import ImageError, denormalize, load_image
    from ernie_vilg.generation.pipelines import decode_image_ids

    images: list[Optional[np.ndarray]] = [None] * len(records)
    labels = ["test image"] * len(records)
    missing = []
    for i, rec in enumerate(records):
        path = resolve_record_image(rec.meta.get("image"), manifest)
        try:
            if path is None:
                raise ImageError(f"{rec.meta.get('image')!r}: image file not found")
            images[i] = denormalize(load_image(path, size))
        except ImageError as exc:
            missing.append(i)
            labels[i] = "missing"
            if len(missing) <= 3:
                log.warning("true image of item %d: %s", i, exc)
    if missing:
        log.warning("%d of %d true test images missing%s", len(missing), len(records),
                    "; showing their gold tokens, decoded" if image_tokenizer is not None else "")
    if missing and image_tokenizer is not None:
        try:
            decoded = decode_image_ids(image_tokenizer, np.stack([records[i].image_ids for i in missing]))
        except Exception as exc:  # noqa: BLE001 - the page is a by-product; never lose the metrics to it
            log.warning("cannot decode the gold tokens of the missing images: %s", exc)
        else:
            for i, img in zip(missing, decoded):
                images[i] = img if img.shape[:2] == (size, size) else None
                labels[i] = "gold tokens, decoded" if images[i] is not None else "missing"
    return images, labels, len(missing)


def gold_judgements(image_tokenizer: Any, records: list[Any]) -> tuple[dict[str, float], dict[int, dict[str, Any]]]:
    """The tokenizer's ceiling on these records: their gold image ids decoded and judged against
    the same claims as the generated images (`judge_gold_*`, via
    `ernie_vilg.vq.evaluate.judge_gold_reconstructions`), and a judgement row per judged index."""
    from ernie_vilg.vq.evaluate import judge_gold_reconstructions

    judged = [(i, claim) for i, rec in enumerate(records) if (claim := _claim(rec)) is not None]
    if not judged:
        return {}, {}
    ids = np.stack([np.asarray(records[i].image_ids, dtype=np.int64) for i, _ in judged])
    metrics, results = judge_gold_reconstructions(image_tokenizer, ids, [c for _, c in judged],
                                                  return_results=True)
    rows = {i: {k: v for k, v in res.to_dict().items() if k.endswith("_ok") or k.endswith("_count")}
            for (i, _), res in zip(judged, results)}
    return metrics, rows


def evaluate_both_directions(bundle: Any, shards_dir: str | Path, out_dir: str | Path, max_items: int = 200,
                             seed: int = 0, num_candidates: int = 1, cfg_scale: Optional[float] = None,
                             caption_cfg_scale: Optional[float] = None) -> dict[str, float]:
    """Score a loaded checkpoint (`VilgBundle`) on held-out token shards; writes OUT/captions.jsonl, OUT/judgements.jsonl,
    OUT/samples/grid.png (first 64 generated images) and OUT/samples/grid_true.png (their true
    images), and OUT/samples/index.html (every item: sample, true image, captions, verdicts; see
    generation/sample_pages.py); with `num_candidates` > 1 also the best-of-N picks
    (OUT/judgements_best_of_N.jsonl, OUT/samples/grid_best_of_N.png). Grid cells are upscaled
    to >= 128 px. For shapes captions the metrics include `judge_gold_*`, the judge on the
    records' own gold tokens decoded (the tokenizer's ceiling). Guidance scales default to the
    checkpoint's Generation.cfg_scale / caption_cfg_scale. Returns the metrics."""
    import paddle

    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.generation.pipelines import save_grid
    from ernie_vilg.generation.sample_pages import SampleRow, write_sample_page

    shards = TokenShards(shards_dir)
    records = [shards[i] for i in range(min(max_items, len(shards)))]
    with paddle.no_grad():
        metrics, outputs = run_both_directions(bundle.model, bundle.text_tokenizer, bundle.image_tokenizer,
                                               records, bundle.cfg, seed, with_meteor=True,
                                               num_candidates=num_candidates, progress=True,
                                               cfg_scale=cfg_scale, caption_cfg_scale=caption_cfg_scale)
    gold_rows: dict[int, dict[str, Any]] = {}
    if bundle.image_tokenizer is not None and records and _is_shapes(records):
        try:
            gold, gold_rows = gold_judgements(bundle.image_tokenizer, records)
            metrics.update(gold)
        except ValueError as exc:  # e.g. shards tokenized by another tokenizer (ids outside its codebook)
            log.warning("judge_gold_* skipped: %s", exc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "captions.jsonl").open("w", encoding="utf-8") as fh:
        for key, caption in outputs["captions"].items():
            rec = records[int(key)]
            fh.write(json.dumps({"id": key, "image": rec.meta.get("image"), "caption": caption,
                                 "references": outputs["references"][key]}, ensure_ascii=False) + "\n")
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    size = outputs["images"].shape[1] if "images" in outputs else bundle.cfg.Data.image_size
    truth, truth_labels, missing = true_images(records, shards.info.get("manifest"), bundle.image_tokenizer, size)
    metrics["true_images_missing"] = float(missing)
    if "images" in outputs:
        save_grid(outputs["images"][:GRID_ITEMS], samples / "grid.png", min_cell=MIN_CELL)
        blank = np.zeros_like(outputs["images"][0])
        save_grid(np.stack([t if t is not None else blank for t in truth[:GRID_ITEMS]]), samples / "grid_true.png",
                  min_cell=MIN_CELL)
    if "images_best" in outputs:
        save_grid(outputs["images_best"][:GRID_ITEMS], samples / f"grid_best_of_{num_candidates}.png",
                  min_cell=MIN_CELL)
    files = {"judgements": "judgements.jsonl", "judgements_best": f"judgements_best_of_{num_candidates}.jsonl"}
    for key, name in files.items():
        if key in outputs:
            with (out / name).open("w", encoding="utf-8") as fh:
                for row in outputs[key]:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    verdicts = {key: {row["index"]: row for row in outputs.get(key, [])} for key in files}
    rows = [SampleRow(index=i, caption=rec.text, generated=outputs["images"][i] if "images" in outputs else None,
                      true_image=truth[i], true_label=truth_labels[i],
                      best=outputs["images_best"][i] if "images_best" in outputs else None,
                      generated_caption=outputs["captions"].get(str(i), ""),
                      references=list(outputs["references"].get(str(i), [])),
                      verdict=verdicts["judgements"].get(i), verdict_best=verdicts["judgements_best"].get(i),
                      verdict_gold=gold_rows.get(i))
            for i, rec in enumerate(records)]
    metrics["count"] = float(len(records))
    page = write_sample_page(samples, rows, metrics)
    log.info("samples page: %s", page)
    return metrics


MEDIA_ITEMS = 8  # validation items shown in VisualDL (the first ones of the val shards: fixed prompts)


def validation_media(model: ErnieViLG, text_tokenizer: Any, image_tokenizer: Optional[Any], shards: Any,
                     cfg: Config, seed: int = 0, items: int = MEDIA_ITEMS) -> Any:
    """data.media.ValidationMedia of the vilg stage: for the first `items` val records (the
    same prompts at every validation), a grid of their true image tokens decoded (top row) over
    the images generated from their texts (bottom row), the prompts, and greedy captions of the
    true tokens beside their references. Without an image tokenizer: the texts only."""
    from ernie_vilg.generation.pipelines import decode_image_ids
    from ernie_vilg.data.media import ValidationMedia, media_grid

    records = [shards[i] for i in range(min(items, len(shards)))]
    media = ValidationMedia()
    if not records:
        return media
    gen = cfg.Generation
    specials = TextSpecials(text_tokenizer.cls_id, text_tokenizer.sep_id, text_tokenizer.pad_id)
    gold = np.stack([r.image_ids for r in records]).astype(np.int64)
    captions = decode_captions(model, text_tokenizer, gold, gen, "greedy", cfg_scale=1.0)
    rows = ["| # | generated caption | references |", "|---|---|---|"]
    for i, (rec, cap) in enumerate(zip(records, captions)):
        refs = " / ".join(references(rec))
        rows.append(f"| {i} | {cap or '(empty)'} | {refs} |".replace("\n", " "))
    media.texts["captions"] = "\n".join(rows)
    media.texts["prompt_list"] = "\n".join(f"{i}. {r.text}" for i, r in enumerate(records))
    if image_tokenizer is not None:
        text_ids = text_tokenizer.encode_batch([r.text for r in records], cfg.Data.max_text_len)
        params = SamplingParams(greedy=False, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
        ids = generate_image_tokens(model, text_ids, params, seed=[seed + i for i in range(len(records))],
                                    cfg_scale=gen.cfg_scale, specials=specials)
        media.images["prompts"] = media_grid([decode_image_ids(image_tokenizer, gold),
                                              decode_image_ids(image_tokenizer, ids)])
    return media
