"""Human-evaluation kits: the Table 8 prompt suite, blind HTML sheets, averaging of ratings."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ernie_vilg.metrics.human_eval import (
    RatingError,
    aggregate_ratings,
    build_sheet,
    format_table,
    items_from_folders,
    items_from_jsonl,
    load_prompt_suite,
    prompt_rows,
)

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "configs/human_eval/prompts.yaml"


def _images(folder: Path, n: int, seed: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"一只猫在草地上 {i}", encoding="utf-8")
    return folder


def _write_ratings(path: Path, key: dict, rater: str, scores: dict[str, dict[str, int]]) -> Path:
    rows = [{"item": item, **scores[item]} for item in key["items"]]
    if path.suffix == ".json":
        path.write_text(json.dumps({"sheet_id": key["sheet_id"], "kind": key["kind"], "rater": rater,
                                    "ratings": rows}), encoding="utf-8")
    else:
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["sheet_id", "kind", "rater", "item"] + key["aspects"])
            for r in rows:
                w.writerow([key["sheet_id"], key["kind"], rater, r["item"]] + [r.get(a, "") for a in key["aspects"]])
    return path


def test_prompt_suite_has_the_nine_aspects_of_table8():
    aspects = load_prompt_suite(SUITE)
    assert len(aspects) == 9 and sum(a.paper_count for a in aspects) == 500
    assert [a.paper_count for a in aspects] == [102, 49, 50, 68, 56, 54, 43, 43, 35]
    assert all(len(a.prompts) >= 3 for a in aspects)
    assert all(re.search(r"[\u4e00-\u9fff]", p) for a in aspects for p in a.prompts)
    rows = prompt_rows(aspects)
    assert len({r["id"] for r in rows}) == len(rows) and rows[0]["aspect"] == "ms_coco"


def test_prompt_suite_with_a_missing_aspect_is_rejected(tmp_path):
    import yaml

    data = yaml.safe_load(SUITE.read_text(encoding="utf-8"))
    data["aspects"] = data["aspects"][:8]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RatingError, match="9 distinct aspects"):
        load_prompt_suite(tmp_path / "s.yaml")


@pytest.fixture
def image_sheet(tmp_path) -> tuple[Path, dict]:
    items = items_from_folders([_images(tmp_path / "ernie_vilg", 2, 0), _images(tmp_path / "cogview", 2, 1)])
    key_path = build_sheet(items, "image", tmp_path / "out/sheet.html", seed=3)
    return tmp_path / "out/sheet.html", json.loads(key_path.read_text(encoding="utf-8"))


def test_image_sheet_is_self_contained_and_blind(image_sheet, tmp_path):
    sheet, key = image_sheet
    page = sheet.read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 4
    assert "ernie_vilg" not in page and "cogview" not in page and str(tmp_path) not in page
    assert "一只猫在草地上 0" in page
    assert page.count('type="radio"') == 4 * 3 * 5  # 4 items x 3 aspects x scores 1..5
    assert sorted(key["items"]) == ["i0001", "i0002", "i0003", "i0004"]
    assert sorted(v["system"] for v in key["items"].values()) == ["cogview", "cogview", "ernie_vilg", "ernie_vilg"]
    assert key["aspects"] == ["clarity", "texture", "relevance"] and (key["min"], key["max"]) == (1, 5)


# A minimal DOM for running the sheet's own export code under node.
_DOM_STUB = r"""
const checked = JSON.parse(process.argv[2]);
const out = [];
globalThis.document = {
  querySelector(sel) { const m = sel.match(/name="([^"]+)"\]:checked/); return m && checked[m[1]] ? {value: checked[m[1]]} : null; },
  getElementById(id) { return {value: "rater, \"A\"", textContent: "", classList: {toggle() {}}}; },
  addEventListener() {}, createElement() { return {click() {}}; } };
globalThis.localStorage = {getItem() { return null; }, setItem() {}};
globalThis.alert = () => {}; globalThis.confirm = () => true;
globalThis.Blob = class { constructor(parts) { out.push(parts.join("")); } };
globalThis.URL = {createObjectURL() { return "blob:"; }};
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_sheet_export_code_round_trips_into_aggregation(image_sheet, tmp_path):
    sheet, key = image_sheet
    script = re.search(r"<script>(.*)</script>", sheet.read_text(encoding="utf-8"), re.S).group(1)
    js = _DOM_STUB + script + '\ndownload("csv"); download("json"); console.log(JSON.stringify(out));\n'
    (tmp_path / "run.js").write_text(js, encoding="utf-8")
    ticks = {f"{item}:{a}": str(n % 5 + 1) for n, item in enumerate(sorted(key["items"])) for a in key["aspects"]}
    del ticks["i0004:texture"]  # one blank answer
    out = subprocess.run(["node", str(tmp_path / "run.js"), json.dumps(ticks)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    csv_text, json_text = json.loads(out.stdout.strip().splitlines()[-1])
    (tmp_path / "r.csv").write_text(csv_text, encoding="utf-8")
    (tmp_path / "r.json").write_text(json_text.replace("rater, ", "other "), encoding="utf-8")
    res = aggregate_ratings([tmp_path / "r.csv", tmp_path / "r.json"], tmp_path / "out/sheet.html.key.json")
    assert res["raters"] == ['rater, "A"', 'other "A"'] and res["missing_ratings"] == 2
    expected = {}
    for item, v in key["items"].items():
        expected.setdefault(v["system"], []).append(int(ticks[f"{item}:clarity"]))
    for system, vals in expected.items():
        assert res["systems"][system]["clarity"] == pytest.approx(sum(vals) / len(vals))


def test_aggregate_image_ratings_from_csv_and_json_raters(image_sheet, tmp_path):
    _, key = image_sheet
    systems = {item: v["system"] for item, v in key["items"].items()}
    r1 = {i: ({"clarity": 5, "texture": 3, "relevance": 4} if systems[i] == "ernie_vilg"
              else {"clarity": 4, "texture": 2, "relevance": 2}) for i in key["items"]}
    r2 = {i: ({"clarity": 4, "texture": 3, "relevance": 3} if systems[i] == "ernie_vilg"
              else {"clarity": 3, "texture": 3}) for i in key["items"]}  # relevance left blank
    files = [_write_ratings(tmp_path / "a.csv", key, "张三", r1), _write_ratings(tmp_path / "b.json", key, "李四", r2)]
    res = aggregate_ratings(files, tmp_path / "out/sheet.html.key.json")
    assert res["raters"] == ["张三", "李四"] and res["missing_ratings"] == 2
    assert res["systems"]["ernie_vilg"] == {"clarity": 4.5, "texture": 3.0, "relevance": 3.5, "n_ratings": 4}
    assert res["systems"]["cogview"]["clarity"] == 3.5 and res["systems"]["cogview"]["relevance"] == 2.0
    table = format_table(res)
    assert table.splitlines()[0].split() == ["Model", "clarity", "texture", "relevance"]
    assert "4.500" in table


def test_bad_rating_files_are_rejected_with_location(image_sheet, tmp_path):
    _, key = image_sheet
    keyfile = tmp_path / "out/sheet.html.key.json"
    good = {i: {"clarity": 3, "texture": 3, "relevance": 3} for i in key["items"]}
    bad = dict(good, i0002={"clarity": 7, "texture": 3, "relevance": 3})
    with pytest.raises(RatingError, match=r"x\.csv:3: clarity = 7 is outside the 1-5"):
        aggregate_ratings([_write_ratings(tmp_path / "x.csv", key, "a", bad)], keyfile)
    other = dict(key, sheet_id="000000000000")
    with pytest.raises(RatingError, match="but the key is for sheet"):
        aggregate_ratings([_write_ratings(tmp_path / "y.json", other, "a", good)], keyfile)
    f = _write_ratings(tmp_path / "z.csv", key, "a", good)
    with pytest.raises(RatingError, match="rater 'a' already has a ratings file"):
        aggregate_ratings([f, f], keyfile)


def test_caption_sheet_and_table5_average(tmp_path):
    img = _images(tmp_path / "imgs", 2, 2)
    lines = [{"image": f"imgs/p{i}.png", "caption": f"一个男人在骑车{i}", "system": s, "id": f"{s}{i}"}
             for s in ("zero-shot", "fine-tuned") for i in range(2)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                          encoding="utf-8")
    items = items_from_jsonl(tmp_path / "items.jsonl")
    assert items[0].image == img / "p0.png"
    key_path = build_sheet(items, "caption", tmp_path / "c.html")
    key = json.loads(key_path.read_text(encoding="utf-8"))
    page = (tmp_path / "c.html").read_text(encoding="utf-8")
    assert page.count('type="radio"') == 4 * 3 * 3 and "zero-shot" not in page
    scores = {i: ({"fluency": 2, "relevance": 1, "richness": 0} if v["system"] == "zero-shot"
                  else {"fluency": 2, "relevance": 2, "richness": 1}) for i, v in key["items"].items()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(REPO / "tools/human_eval.py"), "aggregate", "--key", str(key_path),
                          str(_write_ratings(tmp_path / "r.csv", key, "王五", scores))],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["systems"]["zero-shot"]["average"] == pytest.approx(1.0)
    assert res["systems"]["fine-tuned"]["average"] == pytest.approx(5 / 3)
    assert "average" in out.stderr.splitlines()[0]


def test_items_jsonl_with_missing_image_names_the_line(tmp_path):
    (tmp_path / "items.jsonl").write_text('{"image": "nope.png", "caption": "猫"}\n', encoding="utf-8")
    with pytest.raises(RatingError, match=r"items\.jsonl:1: image not found"):
        items_from_jsonl(tmp_path / "items.jsonl")
