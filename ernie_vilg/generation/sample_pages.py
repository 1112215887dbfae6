"""A page a person can read: the evaluation's samples next to the true images, with the judge's
verdicts and the model's captions (OUT/samples/index.html, written by `evaluate_both_directions`).

The page is one HTML file with no network dependency (no CSS/JS/CDN from elsewhere); its images
are PNG files in the same folder, referenced by relative paths, already upscaled with nearest
neighbour so 32 px samples show crisp pixels at any zoom. Every piece of text is HTML-escaped:
captions come from a model and could hold anything.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

JUDGE_ATTRS = ("shape", "colour", "position", "size", "count", "all")
CAPTION_KEYS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
MIN_SIDE = 128
TICK, CROSS, NONE = "\u2713", "\u2717", "\u2013"
PAGE_NAME = "index.html"


def upscale_nearest(images: np.ndarray, min_side: int) -> np.ndarray:
    """uint8 images [..., H, W, 3] repeated by the smallest integer factor that makes the shorter
    side >= `min_side` (nearest neighbour: a 32 px sample stays crisp pixels, not a blur)."""
    h, w = images.shape[-3], images.shape[-2]
    factor = max(1, -(-int(min_side) // max(1, min(h, w))))
    if factor == 1:
        return images
    return np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)


@dataclass
class SampleRow:
    """One evaluated item. Verdicts are judgement rows as in judgements.jsonl (`<attr>_ok`
    flags, optionally `claimed_count` / `detected_count`); None where the judge did not run."""

    index: int
    caption: str  # the text the images were generated from
    generated: Optional[np.ndarray] = None  # uint8 [H, W, 3], the single sample (candidate 0)
    true_image: Optional[np.ndarray] = None  # uint8 [H, W, 3]
    true_label: str = "test image"  # or "gold tokens, decoded" when the image file is missing
    best: Optional[np.ndarray] = None  # the best-of-N pick
    generated_caption: str = ""  # the model's caption of the true image (its gold tokens)
    references: list[str] = field(default_factory=list)
    verdict: Optional[Mapping[str, Any]] = None
    verdict_best: Optional[Mapping[str, Any]] = None
    verdict_gold: Optional[Mapping[str, Any]] = None  # the decoded gold tokens, judged


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _save_png(image: np.ndarray, path: Path, min_side: int) -> tuple[int, int]:
    from PIL import Image

    big = upscale_nearest(np.asarray(image, dtype=np.uint8), min_side)
    Image.fromarray(big).save(path)
    return big.shape[1], big.shape[0]


def _img_cell(image: Optional[np.ndarray], name: str, out: Path, min_side: int, label: str) -> str:
    if image is None:
        return f'<td class="img missing">{_esc(label or "no image")}</td>'
    w, h = _save_png(image, out / name, min_side)
    return (f'<td class="img"><img src="{_esc(name)}" width="{w}" height="{h}" alt="{_esc(label)}">'
            f'<div class="label">{_esc(label)}</div></td>')


def _verdict_cell(kind: str, verdict: Optional[Mapping[str, Any]]) -> str:
    if verdict is None:
        return f'<td class="verdict" data-kind="{_esc(kind)}"><span class="none">not judged</span></td>'
    marks = []
    for attr in JUDGE_ATTRS:
        ok = verdict.get(f"{attr}_ok")
        cls, sym = ("none", NONE) if ok is None else (("ok", TICK) if ok else ("bad", CROSS))
        extra = ""
        if attr == "count" and "claimed_count" in verdict and "detected_count" in verdict:
            extra = f' <small>({_esc(verdict["claimed_count"])} said, {_esc(verdict["detected_count"])} found)</small>'
        marks.append(f'<li class="mark {cls}" data-attr="{attr}" data-ok="{_esc(ok)}">'
                     f'<b>{sym}</b> {attr}{extra}</li>')
    return f'<td class="verdict" data-kind="{_esc(kind)}"><ul>{"".join(marks)}</ul></td>'


def _pct(value: Optional[float]) -> str:
    return NONE if value is None else f"{100.0 * float(value):.1f}"


def _summary_html(summary: Mapping[str, Any], num_rows: int) -> str:
    best_prefixes = sorted({m.group(0) for k in summary if (m := re.match(r"judge_best_of_\d+_", k))})
    judge_rows = [("single sample", "judge_")]
    judge_rows += [(f"best of {p[len('judge_best_of_'):-1]}", p) for p in best_prefixes]
    judge_rows.append(("gold tokens, decoded (tokenizer ceiling)", "judge_gold_"))
    head = "".join(f"<th>{a}</th>" for a in JUDGE_ATTRS)
    body = []
    for label, prefix in judge_rows:
        values = [summary.get(f"{prefix}{a}") for a in JUDGE_ATTRS]
        if all(v is None for v in values):
            continue
        n = summary.get(f"{prefix}n")
        cells = "".join(f"<td>{_pct(v)}</td>" for v in values)
        body.append(f'<tr data-row="{_esc(prefix)}"><th>{_esc(label)}</th>{cells}'
                    f'<td>{_esc(int(n)) if n is not None else NONE}</td></tr>')
    parts = []
    if body:
        parts.append('<h2>Judge accuracy (% of images right)</h2><table class="summary" id="judge">'
                     f'<tr><th></th>{head}<th>n</th></tr>{"".join(body)}</table>')
    caps = [(k, summary.get(f"caption_{k}")) for k in CAPTION_KEYS if summary.get(f"caption_{k}") is not None]
    if caps:
        parts.append('<h2>Captions of the true images (character level, 0-100)</h2><table class="summary" '
                     'id="captions"><tr>' + "".join(f"<th>{_esc(k)}</th>" for k, _ in caps) + "</tr><tr>"
                     + "".join(f"<td>{float(v):.2f}</td>" for _, v in caps) + "</tr></table>")
    facts = [f"{num_rows} items"]
    if summary.get("true_images_missing"):
        facts.append(f"{int(summary['true_images_missing'])} true image files missing "
                     "(shown as their gold tokens, decoded)")
    parts.append(f'<p class="facts">{_esc("; ".join(facts))}</p>')
    return "\n".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #1f2328; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; }
table.summary td { text-align: right; font-variant-numeric: tabular-nums; }
td.img { text-align: center; }
td.img img { image-rendering: pixelated; image-rendering: crisp-edges; display: block; }
td.missing { color: #6e7781; font-style: italic; min-width: 128px; }
.label { font-size: 80%; color: #6e7781; }
td.verdict ul { list-style: none; margin: 0; padding: 0; }
li.mark { white-space: nowrap; }
li.ok b { color: #1a7f37; }
li.bad b { color: #cf222e; }
li.none b, .none { color: #6e7781; }
li[data-attr="all"] { font-weight: bold; border-top: 1px solid #d0d7de; }
.caption { font-size: 120%; }
.gen { color: #0550ae; }
"""


def write_sample_page(out_dir: str | Path, rows: Sequence[SampleRow], summary: Mapping[str, Any],
                      min_side: int = MIN_SIDE, title: str = "ERNIE-ViLG evaluation samples") -> Path:
    """Write OUT_DIR/index.html and its PNGs (`item-<index>-<kind>.png`, each upscaled to >=
    `min_side` px with nearest neighbour). `summary`: the evaluation's metrics; the page shows
    `judge_*`, `judge_best_of_N_*`, `judge_gold_*` (fractions, shown in %) and `caption_*`
    (0-100) when present. Returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with_best = any(r.best is not None or r.verdict_best is not None for r in rows)
    with_gold = any(r.verdict_gold is not None for r in rows)
    best_label = next((f"best of {m.group(1)}" for k in summary if (m := re.match(r"judge_best_of_(\d+)_", k))),
                      "best of N")
    head = ["#", "generated (single sample)"] + ([best_label] if with_best else [])
    head += ["true image", "caption / the model's caption of the true image", "judge: single sample"]
    head += ([f"judge: {best_label}"] if with_best else []) + (["judge: gold tokens"] if with_gold else [])
    lines = []
    for r in rows:
        stem = f"item-{r.index:04d}"
        cells = [f'<td class="idx">{r.index}</td>',
                 _img_cell(r.generated, f"{stem}-sample.png", out, min_side, "single sample")]
        if with_best:
            cells.append(_img_cell(r.best, f"{stem}-best.png", out, min_side, best_label))
        cells.append(_img_cell(r.true_image, f"{stem}-true.png", out, min_side, r.true_label))
        refs = "".join(f"<li>{_esc(t)}</li>" for t in r.references)
        refs_html = f"<details><summary>references ({len(r.references)})</summary><ul>{refs}</ul></details>" \
            if r.references else ""
        cells.append(f'<td class="text"><div class="caption">{_esc(r.caption)}</div>'
                     f'<div class="gen">model: {_esc(r.generated_caption) or NONE}</div>{refs_html}</td>')
        cells.append(_verdict_cell("single", r.verdict))
        if with_best:
            cells.append(_verdict_cell("best", r.verdict_best))
        if with_gold:
            cells.append(_verdict_cell("gold", r.verdict_gold))
        lines.append(f'<tr class="item" data-index="{r.index}">{"".join(cells)}</tr>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{_esc(title)}</h1>\n{_summary_html(summary, len(rows))}\n"
        f'<h2>Items</h2><p>{TICK} = the judge finds the attribute right, {CROSS} = wrong; images are '
        f"upscaled with nearest neighbour.</p>\n"
        '<table class="items"><tr>' + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>\n"
        + "\n".join(lines) + "\n</table></body></html>\n"
    )
    path = out / PAGE_NAME
    path.write_text(page, encoding="utf-8")
    return path
