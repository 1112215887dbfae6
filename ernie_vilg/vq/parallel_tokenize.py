"""Tokenize a large manifest with several worker processes into one token shard folder.

The manifest is cut into `workers` contiguous byte ranges (at line starts, so slices are whole
lines and roughly equal in size). Worker w encodes its slice with its own copy of the image
tokenizer and writes `OUT/_part-w/w{w:03d}-shard-XXXXX.{npy,jsonl}` with `TokenShardWriter`
(prefix `w{w:03d}-shard`). The parent then moves every part's files into OUT and writes one
info.json listing the shards in worker order, so row order equals manifest order, as with the
single-process `tokenize_images.tokenize_manifest`. info.json is written last: a crash leaves a
folder that `TokenShards` refuses as incomplete.

Workers are spawned (not forked): Paddle's runtime is not fork-safe once initialised.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from ernie_vilg.data.token_shards import FORMAT, TokenShardError, _atomic_write_text, read_shard_info

log = logging.getLogger(__name__)


def split_manifest(manifest: str | Path, parts: int) -> list[tuple[int, int, int]]:
    """`parts` contiguous (start byte, end byte, first line number) slices at line starts.

    One streaming pass (counts newlines before each cut), constant memory."""
    manifest = Path(manifest)
    size = manifest.stat().st_size
    cuts = [0]
    with manifest.open("rb") as fh:
        for p in range(1, parts):
            target = max(size * p // parts, cuts[-1])
            fh.seek(target)
            if target > 0:
                fh.seek(target - 1)
                if fh.read(1) != b"\n":
                    fh.readline()  # move to the start of the next line
            cuts.append(min(fh.tell(), size))
    cuts.append(size)
    slices, line_no = [], 1
    with manifest.open("rb") as fh:
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            slices.append((lo, hi, line_no))
            fh.seek(lo)
            remaining = hi - lo
            while remaining > 0:
                chunk = fh.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                line_no += chunk.count(b"\n")
                remaining -= len(chunk)
    return slices


def _tokenize_slice(job: dict[str, Any]) -> dict[str, Any]:
    """Worker body: encode lines [start, end) of the manifest into job['part'] (own process)."""
    import numpy as np
    import paddle

    from ernie_vilg.data.images import ImageError, load_image
    from ernie_vilg.data.manifest import ManifestError, parse_line
    from ernie_vilg.data.token_shards import TokenShardWriter
    from ernie_vilg.runtime import configure_threads
    from ernie_vilg.checkpoint_io import load_checkpoint_config
    from ernie_vilg.vq.registry import load_tokenizer

    configure_threads(job["threads"])
    ckpt_dir, cfg = load_checkpoint_config(job["ckpt"])
    tokenizer = load_tokenizer(ckpt_dir)
    size = job["image_size"] or cfg.Data.image_size
    grid = tokenizer.grid_size(size)
    manifest = Path(job["manifest"])
    writer = TokenShardWriter(job["part"], grid, tokenizer.codebook_size, job["shard_size"],
                              prefix=f"w{job['worker']:03d}-shard")
    bad_lines = bad_images = 0
    pending: list[tuple[Any, Any]] = []

    def flush() -> None:
        if not pending:
            return
        with paddle.no_grad():
            ids = tokenizer.encode_to_ids(paddle.to_tensor(np.stack([p[0] for p in pending]))).numpy()
        for (_, rec), row in zip(pending, ids):
            meta = {k: v for k, v in rec.extra.items() if k != "_image_raw"}
            meta["image"] = rec.image_path
            writer.add(row, rec.text, rec.texts, meta)
        pending.clear()

    with manifest.open("rb") as fh:
        fh.seek(job["start"])
        line_no = job["first_line"]
        while fh.tell() < job["end"]:
            raw = fh.readline()
            if not raw:
                break
            if raw.strip():
                try:
                    rec = parse_line(raw.rstrip(b"\r\n"), manifest, line_no)
                except ManifestError as exc:
                    bad_lines += 1
                    log.warning("skipping manifest line: %s", exc)
                    rec = None
                if rec is not None:
                    try:
                        pending.append((load_image(rec.image_path, size), rec))
                    except ImageError as exc:
                        bad_images += 1
                        log.warning("skipping: %s", exc)
                    if len(pending) >= job["batch_size"]:
                        flush()
            line_no += 1
    flush()
    info = writer.close()
    return {"part": job["part"], "count": info["count"], "skipped_images": bad_images,
            "skipped_lines": bad_lines, "grid": grid, "codebook_size": tokenizer.codebook_size,
            "image_size": size, "tokenizer_ckpt": str(ckpt_dir.resolve())}


def _compatible_infos(folders: Sequence[str | Path], out: Path) -> list[dict[str, Any]]:
    """The info.json of every folder; TokenShardError unless grid, codebook size and dtype agree."""
    infos = [read_shard_info(p) for p in folders]
    if not infos:
        raise TokenShardError(f"{out}: no shard folders to merge")
    first = infos[0]
    for p, info in zip(folders, infos):
        for key in ("grid", "codebook_size", "dtype"):
            if info[key] != first[key]:
                raise TokenShardError(f"{p}/info.json: {key} {info[key]!r} differs from {first[key]!r}")
    return infos


def merge_shard_infos(parts: Sequence[str | Path], out: str | Path,
                      extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Move the shard files of several part folders (each with its own info.json, distinct
    shard prefixes) into `out`, write one info.json listing them in the given order, and remove
    the part folders. Grid, codebook size and dtype must agree."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = _compatible_infos(parts, out)
    first = infos[0]
    shards: list[dict[str, Any]] = []
    for p, info in zip(parts, infos):
        for s in info["shards"]:
            for name in (s["ids"], s["meta"]):
                if (out / name).exists():
                    raise TokenShardError(f"{out / name}: already exists (shard prefixes must differ)")
                os.replace(Path(p) / name, out / name)  # same filesystem: a rename, no copy
            shards.append(dict(s))
    merged = {"format": FORMAT, "version": first.get("version", 1), "grid": first["grid"],
              "codebook_size": first["codebook_size"], "dtype": first["dtype"],
              "count": sum(s["count"] for s in shards), "shards": shards, **(extra or {})}
    _atomic_write_text(out / "info.json", json.dumps(merged, ensure_ascii=False, indent=1))
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    return merged


def link_shard_folders(sources: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """One shard folder `out` that reads several finished ones in the given order (e.g. a data set
    and fresh images tokenized later with the same tokenizer): symlinks to their shard files
    (renamed `sKKK-<name>` so equal names cannot clash) and one info.json. The sources are left
    as they are. Grid, codebook size and dtype must agree; info keys on which all sources agree
    (tokenizer_ckpt, image_size, ...) are kept, and `sources` lists the folders."""
    out = Path(out)
    if (out / "info.json").exists():
        raise TokenShardError(f"{out}: already a token shard folder (choose a new --out)")
    infos = _compatible_infos(sources, out)
    shards: list[dict[str, Any]] = []
    links: list[tuple[str, Path]] = []
    for k, (src, info) in enumerate(zip(sources, infos)):
        for shard in info["shards"]:
            entry = dict(shard)
            for key in ("ids", "meta"):
                target = (Path(src) / shard[key]).resolve()
                if not target.is_file():
                    raise TokenShardError(f"{target}: listed in {src}/info.json but missing")
                entry[key] = f"s{k:03d}-{shard[key]}"
                links.append((entry[key], target))
            shards.append(entry)
    out.mkdir(parents=True, exist_ok=True)  # every target checked first: a bad source leaves no links
    for name, target in links:
        (out / name).symlink_to(target)
    common = {key: value for key, value in infos[0].items()
              if key not in ("shards", "count") and all(i.get(key) == value for i in infos[1:])}
    merged = {**common, "count": sum(s["count"] for s in shards), "shards": shards,
              "sources": [str(Path(p).resolve()) for p in sources]}
    _atomic_write_text(out / "info.json", json.dumps(merged, ensure_ascii=False, indent=1))  # last
    return merged


def tokenize_manifest_parallel(
    ckpt: str | Path, manifest: str | Path, out: str | Path, workers: int = 2, batch_size: int = 64,
    shard_size: int = 10000, image_size: int = 0, threads_per_worker: int = 1,
) -> dict[str, Any]:
    """`tokenize_images.tokenize_manifest` with `workers` processes; same folder layout, same
    row order, same summary keys (plus `workers`)."""
    import multiprocessing as mp

    manifest, out = Path(manifest), Path(out)
    if not manifest.is_file():
        from ernie_vilg.data.manifest import ManifestError

        raise ManifestError(str(manifest), "manifest file not found")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "info.json").exists():
        (out / "info.json").unlink()  # the folder is being rewritten: never look complete meanwhile
    jobs = [
        {"worker": w, "ckpt": str(ckpt), "manifest": str(manifest.resolve()), "start": lo, "end": hi,
         "first_line": line, "part": str(out / f"_part-{w:03d}"), "batch_size": batch_size,
         "shard_size": shard_size, "image_size": image_size, "threads": threads_per_worker}
        for w, (lo, hi, line) in enumerate(split_manifest(manifest, workers))
    ]
    if workers == 1:
        results = [_tokenize_slice(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_tokenize_slice, jobs, chunksize=1)
    first = results[0]
    if sum(r["count"] for r in results) == 0:
        from ernie_vilg.data.manifest import ManifestError

        for r in results:
            shutil.rmtree(r["part"], ignore_errors=True)
        raise ManifestError(str(manifest), "no usable image-text pair to tokenize ("
                            f"{sum(r['skipped_lines'] for r in results)} bad lines, "
                            f"{sum(r['skipped_images'] for r in results)} bad images)")
    info = merge_shard_infos([r["part"] for r in results], out, extra={
        "tokenizer_ckpt": first["tokenizer_ckpt"], "image_size": first["image_size"],
        "manifest": str(manifest.resolve()), "workers": workers})
    return {"out": str(out), "count": info["count"], "grid": first["grid"],
            "codebook_size": first["codebook_size"],
            "skipped_images": sum(r["skipped_images"] for r in results),
            "skipped_lines": sum(r["skipped_lines"] for r in results), "workers": workers}
