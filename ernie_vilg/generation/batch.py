"""Batch text-to-image from a prompt file (`tools/generate.py --prompts FILE`): resumable, split
over ranks, one image file per kept sample plus a record of what made it.

Output folder:

    {id}.png            the image of prompt `id` (one image kept per prompt), or
    {id}_{k}.png        k = 0 .. K-1 when a prompt keeps several: the candidate index without
                        ranking, the rank (0 = best) with `--keep`
    {id}.txt            the prompt (written last: its presence marks the id finished)
    samples.jsonl       one row per image: id, prompt (and `text`, for human_eval sheet --items),
                        image, seed, candidate, rank, scores; prompt-file order
    .parts/rank-R.jsonl the rows as each rank wrote them (samples.jsonl is rebuilt from these)

Why the images do not depend on how the prompts are batched or split over ranks: every prompt
draws from its own generator, seeded from `--seed` and its id (`prompt_seed`), and texts are
padded to Data.max_text_len, not to the longest prompt of their batch.

A killed run loses at most the batch in flight: PNGs are written under a temporary name and
renamed, the sidecar follows them, and a rerun skips every id with a sidecar. samples.jsonl is
rebuilt by each rank after its last batch under a file lock, so the last rank to finish writes the
complete file (no collective communication is needed).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

SAMPLES_FILE = "samples.jsonl"
PARTS_DIR = ".parts"
# ids become file names: no path separators, no leading dot (hidden / temporary files)
_ID = re.compile(r"^[\w\-][\w.\-]*$", re.UNICODE)


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def read_prompts(path: str | Path) -> list[Prompt]:
    """`.txt`: one prompt a line (blank lines skipped), id = the prompt's index, zero-padded to 5
    digits. `.jsonl`: objects with `text` and optional `id` (default: the line's index), e.g.
    the prompts.jsonl of `eval_fid --sample-captions` or `human_eval prompts`."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts: list[Prompt] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise PromptFileError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise PromptFileError(f"{path}:{n}: needs a non-empty string 'text'")
            pid = str(obj.get("id", len(prompts)))
            if not _ID.match(pid):
                raise PromptFileError(f"{path}:{n}: id {pid!r} cannot be a file name (letters, digits, _ - .)")
            prompts.append(Prompt(pid, obj["text"].strip()))
    elif path.suffix == ".txt":
        texts = [line.strip() for line in lines if line.strip()]
        prompts = [Prompt(f"{i:05d}", t) for i, t in enumerate(texts)]
    else:
        raise PromptFileError(f"{path}: prompt files are .txt (one a line) or .jsonl (id, text)")
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise PromptFileError(f"{path}: id {p.id!r} appears twice")
        seen.add(p.id)
    return prompts


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The seed of one prompt: a hash of (--seed, id), so it survives reordering and rank splits."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rank_share(prompts: Sequence[Prompt], rank: int, world: int) -> list[Prompt]:
    """Round-robin over the whole file (not over the unfinished ids): a resumed run gives each
    prompt to the same rank again when the world size is unchanged."""
    return list(prompts[rank::world])


def image_names(prompt_id: str, count: int) -> list[str]:
    return [f"{prompt_id}.png"] if count == 1 else [f"{prompt_id}_{k}.png" for k in range(count)]


def is_done(out: Path, prompt: Prompt) -> bool:
    """Finished = its sidecar holds this prompt (a sidecar of another prompt under the same id, e.g.
    a second run of --text into the same folder, is regenerated)."""
    side = out / f"{prompt.id}.txt"
    try:
        return side.read_text(encoding="utf-8").strip() == prompt.text
    except (OSError, UnicodeDecodeError):
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of killed writers (`.{name}.tmp-PID` whose PID is gone); another rank's
    live temporaries stay."""
    for tmp in out.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _batches(items: Sequence[Prompt], size: int) -> Iterator[list[Prompt]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


@dataclass
class BatchSettings:
    batch_size: int = 8
    num_candidates: int = 1
    keep: int = 0  # best-of-N: keep the best K (0 = keep all candidates, unranked)
    seed: int = 0
    rank_by: str = ""
    progress: bool = True


def generate_prompt_file(bundle: Any, prompts: Sequence[Prompt], out: str | Path, settings: BatchSettings,
                         reranker: Optional[Any] = None, rank: int = 0, world: int = 1,
                         params: Any = None, cfg_scale: Optional[float] = None,
                         prefix_ids: Optional[np.ndarray] = None, extra: Optional[dict[str, Any]] = None
                         ) -> dict[str, int]:
    """Generate this rank's unfinished prompts into `out`; returns counts (generated, skipped,
    images). `params`: SamplingParams (default: the checkpoint's Generation settings).
    `prefix_ids` [m]: image completion, the first m image tokens of every prompt's images are
    given. `extra`: fields added to every samples.jsonl row."""
    from ernie_vilg.generation.best_of_n import rank_candidates_by, score_candidates
    from ernie_vilg.generation.pipelines import decode_generated, image_sampling_params, text_to_image_ids

    s = settings
    if s.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {s.batch_size}")
    if s.num_candidates < 1:
        raise ValueError(f"--num-candidates must be >= 1, got {s.num_candidates}")
    if s.keep and not 1 <= s.keep <= s.num_candidates:
        raise ValueError(f"--keep must be in [1, --num-candidates={s.num_candidates}], got {s.keep}")
    if bundle.decoder == "tokenizer" and bundle.image_tokenizer is None:
        raise FileNotFoundError(f"{bundle.ckpt_dir}: no image tokenizer to decode image tokens")
    signal = (s.rank_by or ("reranker" if reranker is not None else "likelihood")) if s.keep else ""
    if signal in ("reranker", "both") and reranker is None:
        raise ValueError(f"ranking by {signal!r} needs a reranker checkpoint (--reranker DIR)")
    out = Path(out)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    mine = rank_share(prompts, rank, world)
    todo = [p for p in mine if not is_done(out, p)]
    params = params or image_sampling_params(bundle.cfg.Generation)
    width = bundle.cfg.Data.max_text_len  # fixed width: a prompt's image must not depend on its batch
    kept_per_prompt = s.keep or s.num_candidates
    bar = None
    if s.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="prompt",
                   desc="generate" if world == 1 else f"generate rank {rank}/{world}")
    images_written = 0
    part = out / PARTS_DIR / f"rank-{rank}.jsonl"
    with part.open("a", encoding="utf-8") as part_fh:
        for batch in _batches(todo, s.batch_size):
            seeds = [prompt_seed(s.seed, p.id) for p in batch]
            ids = text_to_image_ids(bundle, [p.text for p in batch], s.num_candidates, seeds, params, cfg_scale,
                                    text_width=width, prefix_ids=prefix_ids)
            images = decode_generated(bundle, [p.text for p in batch], ids, s.num_candidates, text_width=width)
            n = s.num_candidates
            for i, p in enumerate(batch):
                cand_images, cand_ids = images[i * n:(i + 1) * n], ids[i * n:(i + 1) * n]
                order, scores = np.arange(n), {}
                if s.keep:
                    scores = score_candidates(bundle, p.text, cand_images, cand_ids, signal, reranker)
                    order = rank_candidates_by(scores, signal)[:s.keep]
                rows = []
                for k, (name, cand) in enumerate(zip(image_names(p.id, kept_per_prompt), order)):
                    _write_atomic(out / name, _png_bytes(cand_images[int(cand)]))
                    rows.append({"id": p.id, "prompt": p.text, "text": p.text, "image": name, "seed": seeds[i],
                                 "candidate": int(cand), "rank": k if s.keep else None,
                                 "scores": {key: round(float(v[int(cand)]), 6) for key, v in scores.items()},
                                 **(extra or {})})
                # rows before the sidecar: an id with a sidecar always has its rows
                part_fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                part_fh.flush()
                os.fsync(part_fh.fileno())
                _write_atomic(out / f"{p.id}.txt", (p.text + "\n").encode("utf-8"))
                images_written += len(rows)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    merge_samples(out, prompts)
    return {"generated": len(todo), "skipped": len(mine) - len(todo), "images": images_written}


def merge_samples(out: str | Path, prompts: Sequence[Prompt]) -> int:
    """Rebuild samples.jsonl from every rank's part file: finished ids only, prompt-file order,
    the latest row per (id, image). Serialized by a lock; returns the number of rows."""
    out = Path(out)
    order = {p.id: i for i, p in enumerate(prompts)}
    done = {p.id for p in prompts if is_done(out, p)}
    with (out / PARTS_DIR / "merge.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for part in sorted((out / PARTS_DIR).glob("rank-*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a kill: its id has no sidecar and is redone
                    continue
                if row.get("id") in done and row.get("prompt") == prompts[order[row["id"]]].text:
                    rows[(row["id"], row["image"])] = row
        merged = sorted(rows.values(), key=lambda r: (order[r["id"]], r["candidate"] if r["rank"] is None else r["rank"]))
        _write_atomic(out / SAMPLES_FILE,
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged).encode("utf-8"))
    return len(merged)


def generate_batch_to_folder(bundle: Any, prompts: Sequence[Prompt], out: str | Path, settings: BatchSettings,
                             reranker: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None,
                             init_image: Optional[str | Path] = None, keep_rows: int = 0,
                             grid: bool = False) -> dict[str, int]:
    """tools/generate.py (file layout in generation/batch.py): this rank's share of `prompts`,
    generated with the loaded checkpoint `bundle` (`VilgBundle`)
    (rank and world size from paddle.distributed.launch's environment). `grid`: also write
    grid.png of every kept image, one row per prompt (for a handful of --text prompts)."""
    from PIL import Image

    from ernie_vilg.generation.pipelines import apply_sampling_overrides, image_prefix_ids, save_grid
    from ernie_vilg.runtime import world_from_env

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    apply_sampling_overrides(bundle.cfg, overrides or {})
    rr = None
    if reranker:
        from ernie_vilg.models.reranker import load_reranker

        rr = load_reranker(reranker)
    prefix, extra = None, None
    if init_image is not None:
        prefix = image_prefix_ids(bundle, init_image, keep_rows)
        extra = {"init_image": str(init_image), "keep_rows": keep_rows}
    rank, world = world_from_env()
    counts = generate_prompt_file(bundle, prompts, out, settings, rr, rank, world, prefix_ids=prefix, extra=extra)
    if grid and rank == 0:
        kept = settings.keep or settings.num_candidates
        images = [np.asarray(Image.open(out / name).convert("RGB")) for p in prompts
                  for name in image_names(p.id, kept) if (out / name).is_file()]
        if images:
            save_grid(np.stack(images), out / "grid.png", columns=kept if len(prompts) > 1 else 0)
    return counts
