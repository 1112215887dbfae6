"""Every inference and evaluation tool of the README, at the command line with its documented
flags, on the `--smoke` quickstart's own checkpoints (issue 21: `tools/caption.py` failed on every
quickstart image with "expected 64 source ids, got 256" and no test ran the tools on them)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_helpers import run_cli  # noqa: E402

pytestmark = pytest.mark.slow  # the session's smoke quickstart: ~30 s once, shared by these tests


def quickstart_images(qs: Path, n: int = 2) -> list[str]:
    rows = [json.loads(line) for line in (qs / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    return [str(qs / "data" / r["image"]) for r in rows[:n]]




def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_caption_tool_on_quickstart_images(smoke_quickstart):
    images = quickstart_images(smoke_quickstart, 3)
    out = ok(run_cli("tools/caption.py", "--ckpt", str(smoke_quickstart / "vilg"), "--image", *images,
                     "--threads", "1"))
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == images
    assert all(isinstance(r["caption"], str) and r["caption"] for r in rows)


def test_caption_tool_with_beam_search(smoke_quickstart):
    images = quickstart_images(smoke_quickstart, 1)
    out = ok(run_cli("tools/caption.py", "--ckpt", str(smoke_quickstart / "vilg" / "checkpoints"),
                     "--image", *images, "--strategy", "beam"))
    assert json.loads(out.splitlines()[0])["caption"]


def test_generate_tool_writes_one_png_per_sample_at_the_tokenizers_size(smoke_quickstart, tmp_path):
    out = tmp_path / "gen"
    ok(run_cli("tools/generate.py", "--ckpt", str(smoke_quickstart / "vilg"), "--text", "一个红色的圆形",
               "--text", "左上角有一个蓝色的正方形", "--num-candidates", "2", "--out", str(out)))
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png", "grid.png"]
    assert (out / "00001.txt").read_text(encoding="utf-8").strip() == "左上角有一个蓝色的正方形"
    size = Image.open(quickstart_images(smoke_quickstart, 1)[0]).size
    assert Image.open(out / "00000_0.png").size == size  # 32 px smoke world, 8 x 8 tokens at f = 4


def test_generate_tool_best_of_n_by_likelihood(smoke_quickstart, tmp_path):
    out = tmp_path / "best"
    ok(run_cli("tools/generate.py", "--ckpt", str(smoke_quickstart / "vilg"), "--text", "一个红色的圆形",
               "--num-candidates", "2", "--keep", "1", "--out", str(out)))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1 and rows[0]["rank"] == 0 and (out / "00000.png").is_file()
    assert "likelihood" in json.dumps(rows[0]["scores"])


def test_vqa_tool_answers_a_question_about_a_quickstart_image(smoke_quickstart):
    image = quickstart_images(smoke_quickstart, 1)[0]
    out = ok(run_cli("tools/vqa.py", "--ckpt", str(smoke_quickstart / "vilg"), "--image", image,
                     "--question", "图中有几个物体？"))
    row = json.loads(out.splitlines()[-1])
    assert row["image"] == image and isinstance(row["answer"], str)


def test_eval_caption_tool_on_the_captions_of_the_caption_tool(smoke_quickstart, tmp_path):
    qs = smoke_quickstart
    rows = [json.loads(line) for line in (qs / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()][:3]
    images = [str(qs / "data" / r["image"]) for r in rows]
    captions = [json.loads(line) for line in
                ok(run_cli("tools/caption.py", "--ckpt", str(qs / "vilg"), "--image", *images)).splitlines()]
    pred, ref = tmp_path / "pred.jsonl", tmp_path / "ref.jsonl"
    pred.write_text("".join(json.dumps({"id": str(i), "caption": c["caption"]}, ensure_ascii=False) + "\n"
                            for i, c in enumerate(captions)), encoding="utf-8")
    ref.write_text("".join(json.dumps({"id": str(i), "captions": r["texts"]}, ensure_ascii=False) + "\n"
                           for i, r in enumerate(rows)), encoding="utf-8")
    scores = json.loads(ok(run_cli("tools/eval_caption.py", "--pred", str(pred), "--ref", str(ref))))
    for key in ("BLEU-4", "ROUGE-L", "CIDEr"):
        assert 0.0 <= scores[key] <= 100.0 + 1e-9, (key, scores)


def test_eval_fid_tool_between_generated_and_real_images(smoke_quickstart, tmp_path):
    import paddle

    from ernie_vilg.metrics.inception import InceptionV3FID
    from ernie_vilg.metrics.fid import WEIGHTS_FILE

    # the real weights need a download; a random network exercises the same path (incl. the
    # restricted loader on a paddle.save file, which must accept legitimate weights)
    weights = tmp_path / "weights"
    weights.mkdir()
    paddle.seed(0)
    paddle.save(InceptionV3FID().state_dict(), str(weights / WEIGHTS_FILE))
    gen = tmp_path / "gen"
    ok(run_cli("tools/generate.py", "--ckpt", str(smoke_quickstart / "vilg"), "--text", "一个红色的圆形",
               "--num-candidates", "2", "--out", str(gen)))
    (gen / "grid.png").unlink()
    real = tmp_path / "real"
    real.mkdir()
    for path in quickstart_images(smoke_quickstart, 2):
        Image.open(path).save(real / Path(path).name)
    result = json.loads(ok(run_cli("tools/eval_fid.py", str(gen), str(real), "--weights", str(weights),
                                   "--batch-size", "2", "--no-progress", "--save-stats", str(tmp_path / "real.npz"))))
    assert result["count_a"] == 2 and result["count_b"] == 2 and np.isfinite(result["FID"])
    assert (tmp_path / "real.npz").is_file()


def test_export_tool_on_the_quickstart_checkpoint(smoke_quickstart, tmp_path):
    out = tmp_path / "export"
    info = json.loads(ok(run_cli("tools/export.py", "--ckpt", str(smoke_quickstart / "vilg"), "--out", str(out)))
                      .splitlines()[-1])
    assert set(info["graphs"]) == {"txt2img_logits", "img2txt_logits", "vq_decoder"}
    for graph in info["graphs"]:
        assert (out / f"{graph}.pdiparams").stat().st_size > 0
    assert (out / "export.json").is_file()


def test_tokenize_and_vocab_tools_on_the_quickstart_tokenizer(smoke_quickstart, tmp_path):
    qs = smoke_quickstart
    summary = json.loads(ok(run_cli("tools/tokenize_images.py", "--ckpt", str(qs / "vq"), "--manifest",
                                    str(qs / "data" / "val.jsonl"), "--out", str(tmp_path / "tok"))).splitlines()[-1])
    assert summary["count"] == 16 and summary["grid"] == 8
    ok(run_cli("tools/build_vocab.py", "--manifest", str(qs / "data" / "val.jsonl"), "--out", str(tmp_path / "v.txt")))
    assert len((tmp_path / "v.txt").read_text(encoding="utf-8").splitlines()) > 10
