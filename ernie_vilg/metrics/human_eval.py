"""Human-evaluation kits: the prompt suite, blind HTML rating sheets, and averaging of ratings.

- Images (paper Table 2): each rated 1-5 on clarity, texture, relevance to the text.
- Captions (paper Table 5): each rated 0-2 on fluency, relevance, richness; plus their average.

A sheet is one self-contained HTML file (images embedded as base64, no network) that shows the
items in a seeded random order with opaque ids (``i0001``...); which system produced an item is
kept out of the sheet, in a key file written beside it (``<sheet>.key.json``), so raters are blind.
The sheet exports the filled ratings as CSV or JSON; `aggregate_ratings` averages the files of
several raters per system with the key.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import mimetypes
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

KINDS: dict[str, dict[str, Any]] = {
    "image": {"aspects": ["clarity", "texture", "relevance"], "min": 1, "max": 5,
              "labels": {"clarity": "Image clarity 清晰度", "texture": "Texture quality 纹理质量",
                         "relevance": "Relevance to the text 图文相关性"}},
    "caption": {"aspects": ["fluency", "relevance", "richness"], "min": 0, "max": 2,
                "labels": {"fluency": "Fluency 流畅度", "relevance": "Relevance 相关性",
                           "richness": "Richness 丰富度"}},
}
PAPER_ASPECTS = 9  # Appendix A, Table 8
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class RatingError(ValueError):
    """Bad prompt suite, items or rating files; the message names the file (and row)."""


# ----------------------------------------------------------------------------- prompt suite


@dataclass
class Aspect:
    key: str
    name: str
    name_zh: str
    paper_count: int
    prompts: list[str]


def load_prompt_suite(path: str | Path) -> list[Aspect]:
    """The YAML suite; checks the nine aspects of Table 8 each have at least one prompt."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("aspects"), list):
        raise RatingError(f"{path}: expected a mapping with an 'aspects' list")
    aspects = []
    for i, a in enumerate(data["aspects"]):
        try:
            aspect = Aspect(str(a["key"]), str(a["name"]), str(a["name_zh"]), int(a["paper_count"]),
                            [str(p).strip() for p in a["prompts"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise RatingError(f"{path}: aspects[{i}]: {exc!r} (needs key, name, name_zh, paper_count, prompts)") from None
        if not aspect.prompts or not all(aspect.prompts):
            raise RatingError(f"{path}: aspects[{i}] ({aspect.key}): empty prompt list or empty prompt")
        aspects.append(aspect)
    if len(aspects) != PAPER_ASPECTS or len({a.key for a in aspects}) != PAPER_ASPECTS:
        raise RatingError(f"{path}: expected the {PAPER_ASPECTS} distinct aspects of the paper's Table 8, got {len(aspects)}")
    return aspects


def prompt_rows(aspects: Sequence[Aspect]) -> list[dict[str, Any]]:
    """One row per prompt (``id``, ``aspect``, ``text``), e.g. to feed tools/generate.py."""
    return [{"id": f"{a.key}-{i:03d}", "aspect": a.key, "text": p} for a in aspects for i, p in enumerate(a.prompts)]


# ----------------------------------------------------------------------------- items


@dataclass
class RatingItem:
    image: Path
    text: str  # the prompt (image sheets) or the caption (caption sheets)
    system: str = ""
    source_id: str = ""


def items_from_folders(folders: Sequence[str | Path]) -> list[RatingItem]:
    """Every image of each folder; system = folder name; text = sidecar ``<stem>.txt`` or the stem."""
    items = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise RatingError(f"{folder}: not a folder")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise RatingError(f"{folder}: no images")
        for f in files:
            side = f.with_suffix(".txt")
            text = side.read_text(encoding="utf-8").strip() if side.is_file() else f.stem
            items.append(RatingItem(f, text, folder.name, f.stem))
    return items


def items_from_jsonl(path: str | Path, text_keys: Sequence[str] = ("caption", "text")) -> list[RatingItem]:
    """Lines with ``image`` (relative to the file) and a caption/text; optional ``system``, ``id``."""
    path = Path(path)
    items = []
    for line_no, obj in _json_objects(path):
        text = next((obj[k] for k in text_keys if isinstance(obj.get(k), str)), None)
        if not isinstance(obj.get("image"), str) or text is None:
            raise RatingError(f"{path}:{line_no}: needs 'image' and one of {list(text_keys)}")
        image = Path(obj["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise RatingError(f"{path}:{line_no}: image not found: {image}")
        items.append(RatingItem(image, text, str(obj.get("system", "")), str(obj.get("id", line_no))))
    if not items:
        raise RatingError(f"{path}: no items")
    return items


def _json_objects(path: Path) -> Any:
    # Not caption.iter_json_lines: that one insists on an "id", which rating lists may omit.
    if not path.is_file():
        raise RatingError(f"{path}: file not found")
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RatingError(f"{path}:{line_no}: not a UTF-8 JSON line ({exc})") from None
        if not isinstance(obj, dict):
            raise RatingError(f"{path}:{line_no}: expected a JSON object")
        yield line_no, obj


# ----------------------------------------------------------------------------- the sheet

_PAGE = """<!DOCTYPE html>
<html lang="zh"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font-family:sans-serif;max-width:980px;margin:auto;padding:1em}}
.item{{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:1em;display:flex;gap:1em}}
.item img{{max-width:384px;max-height:384px}} .text{{font-size:1.2em;margin-bottom:.6em}}
.q{{margin:.3em 0}} .q label{{margin-right:.6em}} .missing{{background:#fff3f3}}
#bar{{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}}
</style></head><body>
<h1>{title}</h1>
<p>{instructions}</p>
<div id="bar">Rater 评分人: <input id="rater" placeholder="your name">
<button onclick="download('csv')">Download CSV</button> <button onclick="download('json')">Download JSON</button>
<span id="progress"></span></div>
{items}
<script>
const SHEET = {sheet_json};
const store = "rating-sheet-" + SHEET.sheet_id;
function collect() {{
  const rows = [];
  for (const id of SHEET.items) {{
    const row = {{item: id}};
    for (const a of SHEET.aspects) {{
      const c = document.querySelector(`input[name="${{id}}:${{a}}"]:checked`);
      row[a] = c ? Number(c.value) : null;
    }}
    rows.push(row);
  }}
  return rows;
}}
function refresh() {{
  const rows = collect();
  let done = 0;
  for (const r of rows) {{
    const full = SHEET.aspects.every(a => r[a] !== null);
    done += full;
    document.getElementById(r.item).classList.toggle("missing", !full);
  }}
  document.getElementById("progress").textContent = ` ${{done}} / ${{rows.length}} rated`;
  localStorage.setItem(store, JSON.stringify({{rater: document.getElementById("rater").value, rows}}));
}}
function restore() {{
  const saved = JSON.parse(localStorage.getItem(store) || "null");
  if (!saved) return;
  document.getElementById("rater").value = saved.rater || "";
  for (const r of saved.rows) for (const a of SHEET.aspects) if (r[a] !== null) {{
    const el = document.querySelector(`input[name="${{r.item}}:${{a}}"][value="${{r[a]}}"]`);
    if (el) el.checked = true;
  }}
}}
function download(fmt) {{
  const rater = document.getElementById("rater").value.trim();
  if (!rater) {{ alert("Please enter your name first / 请先填写评分人"); return; }}
  const rows = collect();
  const missing = rows.filter(r => SHEET.aspects.some(a => r[a] === null)).length;
  if (missing && !confirm(missing + " item(s) are not fully rated. Export anyway?")) return;
  let body, type;
  if (fmt === "json") {{
    body = JSON.stringify({{sheet_id: SHEET.sheet_id, kind: SHEET.kind, rater, ratings: rows}}, null, 1);
    type = "application/json";
  }} else {{
    const head = ["sheet_id", "kind", "rater", "item"].concat(SHEET.aspects);
    const esc = v => '"' + String(v).replace(/"/g, '""') + '"';
    body = [head.join(",")].concat(rows.map(r => [SHEET.sheet_id, SHEET.kind, esc(rater), r.item]
      .concat(SHEET.aspects.map(a => r[a] === null ? "" : r[a])).join(","))).join("\\n") + "\\n";
    type = "text/csv";
  }}
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([body], {{type}}));
  a.download = `ratings-${{SHEET.sheet_id}}-${{rater}}.${{fmt}}`;
  a.click();
}}
document.addEventListener("change", refresh);
restore(); refresh();
</script></body></html>
"""


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_sheet(items: Sequence[RatingItem], kind: str, out_html: str | Path, seed: int = 0,
                title: str | None = None) -> Path:
    """Write the blind rating sheet and its key (``<out>.key.json``); returns the key path."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}")
    if not items:
        raise RatingError("no items to rate")
    spec = KINDS[kind]
    out_html = Path(out_html)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)  # systems interleaved, so raters cannot tell them by position
    ids = [f"i{n + 1:04d}" for n in range(len(items))]
    digest = hashlib.sha1(json.dumps([[str(items[i].image), items[i].text, items[i].system] for i in order],
                                     ensure_ascii=False).encode()).hexdigest()[:12]
    blocks = []
    for item_id, idx in zip(ids, order):
        it = items[idx]
        questions = []
        for a in spec["aspects"]:
            radios = "".join(f'<label><input type="radio" name="{item_id}:{a}" value="{v}"> {v}</label>'
                             for v in range(spec["min"], spec["max"] + 1))
            questions.append(f'<div class="q"><b>{html.escape(spec["labels"][a])}</b>: {radios}</div>')
        label = "Prompt 文本" if kind == "image" else "Caption 描述"
        blocks.append(f'<div class="item" id="{item_id}"><img src="{_data_uri(it.image)}" alt="{item_id}">'
                      f'<div><div>{item_id}</div><div class="text">{label}: {html.escape(it.text)}</div>'
                      f'{"".join(questions)}</div></div>')
    scale = f"{spec['min']}-{spec['max']}"
    instructions = (f"Rate each {'image' if kind == 'image' else 'caption'} from {scale} (higher is better) on "
                    + ", ".join(spec["labels"][a] for a in spec["aspects"])
                    + ". Your choices are kept in this browser; export them with a Download button and send the file back.")
    sheet = {"sheet_id": digest, "kind": kind, "aspects": spec["aspects"], "items": ids}
    page = _PAGE.format(title=html.escape(title or f"{kind.capitalize()} rating sheet {digest}"),
                        instructions=html.escape(instructions), items="\n".join(blocks),
                        sheet_json=json.dumps(sheet))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(page, encoding="utf-8")
    key = {"sheet_id": digest, "kind": kind, "aspects": spec["aspects"], "min": spec["min"], "max": spec["max"],
           "items": {item_id: {"system": items[idx].system, "id": items[idx].source_id, "text": items[idx].text,
                               "image": str(items[idx].image)} for item_id, idx in zip(ids, order)}}
    key_path = out_html.with_name(out_html.name + ".key.json")
    key_path.write_text(json.dumps(key, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return key_path


# ----------------------------------------------------------------------------- aggregation


def read_ratings(path: str | Path, key: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(rater, rows) of one exported CSV or JSON file, validated against the sheet's key."""
    path = Path(path)
    aspects, lo, hi = key["aspects"], key["min"], key["max"]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RatingError(f"{path}: not UTF-8 ({exc.reason})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RatingError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        sheet_id, rater, rows = data.get("sheet_id"), data.get("rater"), data.get("ratings")
        if not isinstance(rows, list):
            raise RatingError(f"{path}: missing 'ratings' list")
        where = [f"{path}: ratings[{i}]" for i in range(len(rows))]
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        if not rows:
            raise RatingError(f"{path}: no rating rows")
        sheet_id, rater = rows[0].get("sheet_id"), rows[0].get("rater")
        where = [f"{path}:{i + 2}" for i in range(len(rows))]
    if sheet_id != key["sheet_id"]:
        raise RatingError(f"{path}: ratings for sheet {sheet_id!r}, but the key is for sheet {key['sheet_id']!r}")
    if not rater:
        raise RatingError(f"{path}: no rater name")
    out = []
    for w, row in zip(where, rows):
        item = row.get("item")
        if item not in key["items"]:
            raise RatingError(f"{w}: unknown item {item!r}")
        scores = {}
        for a in aspects:
            v = row.get(a)
            if v in (None, ""):
                continue  # left blank: counted as missing, not as a score
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise RatingError(f"{w}: {a} = {v!r} is not a number") from None
            if not (lo <= v <= hi and v == int(v)):
                raise RatingError(f"{w}: {a} = {v:g} is outside the {lo}-{hi} integer scale")
            scores[a] = v
        out.append({"item": item, **scores})
    return str(rater), out


def aggregate_ratings(rating_files: Sequence[str | Path], key_file: str | Path) -> dict[str, Any]:
    """Mean score per system and aspect over all raters and items (paper Table 2 / Table 5 form).

    Caption sheets also get ``average`` (mean of the three aspects, Table 5's last column).
    """
    key_file = Path(key_file)
    key = json.loads(key_file.read_text(encoding="utf-8"))
    aspects = key["aspects"]
    sums: dict[str, dict[str, list[float]]] = {}
    raters, missing, seen = [], 0, set()
    for f in rating_files:
        rater, rows = read_ratings(f, key)
        if rater in seen:
            raise RatingError(f"{f}: rater {rater!r} already has a ratings file")
        seen.add(rater)
        raters.append(rater)
        for row in rows:
            system = key["items"][row["item"]]["system"] or "(unnamed)"
            per = sums.setdefault(system, {a: [] for a in aspects})
            for a in aspects:
                if a in row:
                    per[a].append(row[a])
                else:
                    missing += 1
    if not sums:
        raise RatingError("no ratings")
    systems = {}
    for system, per in sorted(sums.items()):
        means = {a: (sum(v) / len(v) if v else None) for a, v in per.items()}
        if key["kind"] == "caption" and all(m is not None for m in means.values()):
            means["average"] = sum(means[a] for a in aspects) / len(aspects)
        means["n_ratings"] = min(len(v) for v in per.values())
        systems[system] = means
    return {"kind": key["kind"], "aspects": aspects, "sheet_id": key["sheet_id"], "raters": raters,
            "missing_ratings": missing,
            "scale": f"{key['min']}-{key['max']}", "systems": systems}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table in the paper's layout (systems as rows, aspects as columns)."""
    cols = result["aspects"] + (["average"] if result["kind"] == "caption" else [])
    head = ["Model"] + cols
    rows = [[name] + ["-" if s.get(c) is None else f"{s[c]:.3f}" for c in cols] for name, s in result["systems"].items()]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
