"""The evaluation's human-readable output: samples/index.html (one row per item, upscaled images,
escaped text, the judge's marks), upscaled grids, and `judge_gold_*` in the metrics."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

from ernie_vilg.generation.pipelines import save_grid
from ernie_vilg.generation.sample_pages import JUDGE_ATTRS, SampleRow, upscale_nearest, write_sample_page

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "<script>alert('x')</script>"


class PageParser(HTMLParser):
    """Collects the item rows, the verdict marks per (row, kind, attr) and every img src."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []
        self.srcs: list[str] = []
        self.marks: dict[tuple[int, str, str], dict[str, str]] = {}
        self.true_labels: dict[int, str] = {}
        self._row = self._kind = self._mark = None
        self._in_b = False
        self._img_alt: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "item":
            self._row = int(a["data-index"])
            self.rows.append(self._row)
        elif tag == "td" and a.get("class") == "verdict":
            self._kind = a["data-kind"]
        elif tag == "li" and "mark" in (a.get("class") or ""):
            self._mark = (self._row, self._kind, a["data-attr"])
            self.marks[self._mark] = {"ok": a["data-ok"], "class": a["class"], "sym": ""}
        elif tag == "b" and self._mark is not None:
            self._in_b = True
        elif tag == "img":
            self.srcs.append(a["src"])
            if a["src"].endswith("-true.png"):
                self.true_labels[self._row] = a["alt"]

    def handle_endtag(self, tag):
        if tag == "b":
            self._in_b = False
        elif tag == "li":
            self._mark = None

    def handle_data(self, data):
        if self._in_b and self._mark is not None:
            self.marks[self._mark]["sym"] += data


def parse(page: Path) -> PageParser:
    p = PageParser()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def _img(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3)).astype(np.uint8)


# ------------------------------------------------------------------------------ the page alone
def test_page_rows_marks_escaping_and_upscaled_images(tmp_path) -> None:
    verdict = {f"{a}_ok": True for a in JUDGE_ATTRS} | {"shape_ok": False, "all_ok": False,
                                                         "claimed_count": 2, "detected_count": 2}
    rows = [
        SampleRow(0, SCRIPT, generated=_img(0), true_image=_img(1), best=_img(2),
                  generated_caption="<b>bold</b> & co", references=[SCRIPT, "二"], verdict=verdict,
                  verdict_best={f"{a}_ok": True for a in JUDGE_ATTRS}),
        SampleRow(1, "一个红色的圆形", generated=_img(3), true_image=None, true_label="missing", best=_img(4)),
    ]
    summary = {"judge_shape": 0.5, "judge_all": 0.25, "judge_n": 2.0, "judge_best_of_4_shape": 1.0,
               "judge_gold_all": 0.75, "caption_BLEU-4": 12.5, "caption_CIDEr": 80.0}
    page = write_sample_page(tmp_path / "samples", rows, summary)
    text = page.read_text(encoding="utf-8")
    assert page == tmp_path / "samples" / "index.html"
    # escaped, never live markup
    assert SCRIPT not in text and "<b>bold</b>" not in text
    assert html_escaped(SCRIPT) in text and "&lt;b&gt;bold&lt;/b&gt; &amp; co" in text
    assert "http" not in text and "<link" not in text  # self-contained
    p = parse(page)
    assert p.rows == [0, 1]
    # row 0: shape and all wrong -> crosses, the rest ticks; best-of-N all ticks
    for attr in JUDGE_ATTRS:
        single, best = p.marks[(0, "single", attr)], p.marks[(0, "best", attr)]
        want_ok = verdict[f"{attr}_ok"]
        assert single["sym"] == ("\u2713" if want_ok else "\u2717") and single["ok"] == str(want_ok), attr
        assert ("bad" in single["class"]) == (not want_ok)
        assert best["sym"] == "\u2713"
    assert (1, "single", "shape") not in p.marks  # not judged: no marks at all
    # 3 images for row 0, 2 for row 1 (its true image is missing); all exist, >= 128 px, crisp
    assert len(p.srcs) == 5
    for src in p.srcs:
        assert "/" not in src  # next to the page
        with Image.open(page.parent / src) as im:
            assert min(im.size) >= 128
    big = np.asarray(Image.open(page.parent / "item-0000-sample.png"))
    np.testing.assert_array_equal(big, upscale_nearest(_img(0), 128))
    assert big.shape == (128, 128, 3) and (big[:8, :8] == _img(0)[0, 0]).all()  # nearest: 8x8 blocks
    # the summary: single, best-of-4 and gold rows in %, caption metrics
    assert 'data-row="judge_"' in text and 'data-row="judge_best_of_4_"' in text and 'data-row="judge_gold_"' in text
    assert "<td>50.0</td>" in text and "<td>75.0</td>" in text and "<td>12.50</td>" in text


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_save_grid_upscales_only_when_asked(tmp_path) -> None:
    images = np.stack([_img(i) for i in range(5)])
    save_grid(images, tmp_path / "plain.png")
    save_grid(images, tmp_path / "big.png", min_cell=128)
    plain, big = np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(Image.open(tmp_path / "big.png"))
    assert plain.shape == (2 * 16, 3 * 16, 3)  # today's behaviour: 3 columns, native size
    assert big.shape == (2 * 128, 3 * 128, 3)
    np.testing.assert_array_equal(big[::8, ::8], plain)  # nearest neighbour, no interpolation


# ------------------------------------------------------------------------------ the evaluation
@pytest.fixture
def tiny_eval(tmp_path, monkeypatch):
    """A random tiny ERNIE-ViLG + random tiny VQVAE (no training) over 4 shapes test items with
    real image files; item 2's file is deleted and item 1's caption is markup (outside the grammar,
    so the judge falls back to its attrs)."""
    from ernie_vilg.config import load_config
    from ernie_vilg.data.shapes import make_item
    from ernie_vilg.data.token_shards import TokenShardWriter
    from ernie_vilg.generation import pipelines
    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.text.tokenizer import TextTokenizer
    from ernie_vilg.text.vocab import build_vocab
    from ernie_vilg.vq.registry import build_tokenizer

    size, n = 16, 4
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    items = []
    for i in range(n):
        img, rec = make_item(0, "test", i, size=size)
        img.save(data / "images" / f"{i}.png")
        items.append(rec)
    items[1]["text"] = SCRIPT
    manifest = data / "test.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"images/{i}.png", "text": it["text"], "texts": it["texts"]},
                                           ensure_ascii=False) + "\n" for i, it in enumerate(items)), encoding="utf-8")
    build_vocab([manifest], tmp_path / "vocab.txt")
    text_tok = TextTokenizer(tmp_path / "vocab.txt")
    vq_cfg = load_config(REPO / "configs/vq/tiny_vqvae.yaml", [f"Data.image_size={size}"])
    paddle.seed(0)
    image_tok = build_tokenizer(vq_cfg.VQ)
    image_tok.eval()
    grid, codebook = size // 4, vq_cfg.VQ.codebook_size
    cfg = load_config(REPO / "configs/vilg/tiny.yaml", [
        f"Data.image_size={size}", "Data.max_text_len=40", "Model.max_text_len=40",
        f"Model.text_vocab_size={text_tok.vocab_size}", f"Model.image_vocab_size={codebook}",
        f"Model.image_grid={grid}", "Generation.top_k=8", "Generation.max_text_len=8"])
    model = ErnieViLG(cfg.Model)
    model.eval()
    bundle = pipelines.VilgBundle(cfg, model, text_tok, image_tok, tmp_path)
    writer = TokenShardWriter(tmp_path / "test", grid, codebook, shard_size=8,
                              info={"manifest": str(manifest.resolve())})
    r = np.random.default_rng(0)
    gold = r.integers(0, codebook, (n, grid, grid))
    for i, it in enumerate(items):
        # the path as tokenize_manifest stores it when run from another cwd: relative, prefixed
        writer.add(gold[i], it["text"], it["texts"], {"attrs": it["attrs"], "image": f"elsewhere/images/{i}.png"})
    writer.close()
    (data / "images" / "2.png").unlink()
    return {"shards": tmp_path / "test", "out": tmp_path / "eval", "data": data, "gold": gold,
            "bundle": bundle, "n": n, "size": size}


def test_evaluation_writes_the_page_grids_and_judge_gold(tiny_eval) -> None:
    from ernie_vilg.data.images import denormalize, load_image
    from ernie_vilg.generation.evaluate import evaluate_both_directions
    from ernie_vilg.generation.pipelines import decode_image_ids

    t, n, k = tiny_eval, tiny_eval["n"], 2
    metrics = evaluate_both_directions(t["bundle"], t["shards"], t["out"], max_items=n, seed=0, num_candidates=k)
    # the tokenizer's ceiling next to the generated images' scores
    for attr in JUDGE_ATTRS:
        assert 0.0 <= metrics[f"judge_gold_{attr}"] <= 1.0, attr
    assert metrics["judge_gold_n"] == n  # item 1 judged against its attrs
    assert metrics["true_images_missing"] == 1.0
    samples = t["out"] / "samples"
    page = samples / "index.html"
    p = parse(page)
    assert p.rows == list(range(n))
    assert SCRIPT not in page.read_text(encoding="utf-8")
    for src in p.srcs:
        with Image.open(samples / src) as im:
            assert min(im.size) >= 128, src
    # true images: files found under the manifest's folder; the deleted one is its gold tokens decoded
    assert p.true_labels == {0: "test image", 1: "test image", 2: "gold tokens, decoded", 3: "test image"}
    true0 = np.asarray(Image.open(samples / "item-0000-true.png"))
    np.testing.assert_array_equal(true0, upscale_nearest(denormalize(load_image(t["data"] / "images/0.png",
                                                                                 t["size"])), 128))
    with paddle.no_grad():
        decoded = decode_image_ids(t["bundle"].image_tokenizer, t["gold"][2:3])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(samples / "item-0002-true.png")),
                                  upscale_nearest(decoded, 128))
    # the marks are the judgement files' verdicts, row by row
    for kind, name in (("single", "judgements.jsonl"), ("best", f"judgements_best_of_{k}.jsonl")):
        rows = [json.loads(line) for line in (t["out"] / name).read_text(encoding="utf-8").splitlines()]
        assert [row["index"] for row in rows] == list(range(n))
        for row in rows:
            for attr in JUDGE_ATTRS:
                mark = p.marks[(row["index"], kind, attr)]
                assert mark["ok"] == str(row[f"{attr}_ok"]), (kind, row["index"], attr)
                assert mark["sym"] == ("\u2713" if row[f"{attr}_ok"] else "\u2717")
    assert all((i, "gold", "all") in p.marks for i in range(n))
    # grids: 2 x 2 cells of 128 px, the true grid in the same layout
    for name in ("grid.png", f"grid_best_of_{k}.png", "grid_true.png"):
        with Image.open(samples / name) as im:
            assert im.size == (256, 256), name
    grid_true = np.asarray(Image.open(samples / "grid_true.png"))
    np.testing.assert_array_equal(grid_true[:128, :128], true0)


def test_evaluation_without_any_true_image_or_tokenizer_fallback_still_finishes(tiny_eval, monkeypatch) -> None:
    """Every image file gone and no decoder for the fallback: the metrics and the page still come."""
    from ernie_vilg.generation import evaluate

    t = tiny_eval
    for f in (t["data"] / "images").glob("*.png"):
        f.unlink()
    real = evaluate.true_images
    monkeypatch.setattr(evaluate, "true_images",
                        lambda records, manifest, image_tokenizer, size: real(records, manifest, None, size))
    metrics = evaluate.evaluate_both_directions(t["bundle"], t["shards"], t["out"], max_items=t["n"])
    assert metrics["true_images_missing"] == t["n"]
    p = parse(t["out"] / "samples" / "index.html")
    assert p.rows == list(range(t["n"])) and not p.true_labels  # no true image shown, none invented
    assert "judge_gold_all" in metrics and "judge_shape" in metrics


def test_judge_reports_accuracy_by_the_number_of_objects_named() -> None:
    """`judge_objectsN_*`: true images of 1- and 2-object scenes score 1; blanking the 2-object
    images drops only their group."""
    from types import SimpleNamespace

    from ernie_vilg.data.shapes import caption_with_template, render_scene, sample_scene
    from ernie_vilg.generation.evaluate import _judge

    rng = np.random.default_rng(0)
    images, records = [], []
    for count in (1, 1, 2, 2, 2):
        scene = sample_scene(rng, min_objects=count, max_objects=count, jitter=False)
        images.append(np.asarray(render_scene(scene, 48)))
        records.append(SimpleNamespace(text=caption_with_template(scene, "t1", rng), meta={"attrs": scene.to_attrs()}))
    metrics, _ = _judge(np.stack(images), records)
    assert metrics["judge_objects1_n"] == 2 and metrics["judge_objects2_n"] == 3
    assert metrics["judge_objects1_all"] == 1.0 and metrics["judge_objects2_all"] == 1.0
    blanked = np.stack(images)
    blanked[2:] = 0  # no object left in the 2-object images
    metrics, _ = _judge(blanked, records)
    assert metrics["judge_objects1_all"] == 1.0 and metrics["judge_objects2_all"] == 0.0
    assert metrics["judge_all"] == pytest.approx(2 / 5)
