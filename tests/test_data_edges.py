"""Manifest and data edge cases found by the reliability probe (issue 21): each is a bad line
(skipped and counted) or a one-line error, never a hang, a crash deep inside, or 0 rows written."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_helpers import assert_one_line_error, run_cli  # noqa: E402
from test_safetensors import make_checkpoint, tiny_vq_config  # noqa: E402

from ernie_vilg.data.filter import filter_manifest  # noqa: E402
from ernie_vilg.data.images import ImageBatches, ImageError  # noqa: E402
from ernie_vilg.data.manifest import ManifestError, ManifestStats, iter_manifest, read_manifest  # noqa: E402


class Hang(BaseException):
    """Not an Exception: the image loader turns every Exception into a skipped image."""


@pytest.fixture()
def alarm():
    """Turn a hang into a failure after `seconds` (the old code looped forever)."""
    def handler(signum, frame):
        raise Hang("ImageBatches never stopped")

    old = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_every_image_bad_with_a_path_on_two_lines_stops_instead_of_hanging(tmp_path, alarm):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [{"image": "bad.png", "text": "红"}, {"image": "bad.png", "text": "蓝"}, {"image": "gone.png", "text": "绿"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    alarm(20)
    with pytest.raises(ImageError, match="every image of the manifest failed to load"):
        next(iter(ImageBatches(tmp_path / "m.jsonl", 16, batch_size=2)))


DEEP = b'{"image": "a.png", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("raw, reason", [
    (DEEP, "not valid JSON (nested too deeply)"),
    (b'{"image": "a.png", "text": "\\ud800 red"}', "not UTF-8 (a lone surrogate"),
    (b'{"image": "a.png", "text": "\xe2\x80\x8b\xe2\x80\x8b"}', "'text' has no visible characters"),
    (b'{"image": "a.png", "text": "\\u200b\\u2060\\ufeff"}', "'text' has no visible characters"),
], ids=["deep-nesting", "lone-surrogate", "zero-width-utf8", "zero-width-escaped"])
def test_hostile_manifest_line_is_a_bad_line(tmp_path, raw, reason):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"image": "a.png", "text": "good"}\n' + raw + b"\n")
    stats = ManifestStats()
    assert [r.text for r in iter_manifest(path, stats=stats)] == ["good"] and stats.skipped == 1
    with pytest.raises(ManifestError) as info:
        read_manifest(path, strict=True)
    assert f"m.jsonl:2: {reason}" in str(info.value)


def test_zero_width_references_are_dropped_but_the_caption_kept(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image": "a.png", "text": "红色", "texts": ["\u200b", "蓝色"]}) + "\n", encoding="utf-8")
    (rec,) = read_manifest(path, strict=True)
    assert rec.texts == ["红色", "蓝色"]


def test_a_utf8_bom_does_not_drop_the_first_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"image": "a.png", "text": "第一行"}\n{"image": "b.png", "text": "第二行"}\n'.encode())
    assert [r.text for r in read_manifest(path, strict=True)] == ["第一行", "第二行"]


def test_filter_survives_deep_nesting_surrogates_bom_and_zero_width_text(tmp_path):
    path = tmp_path / "m.jsonl"
    good = '{"image": "a.png", "text": "一个红色的圆形"}'.encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + DEEP + b"\n" + b'{"image": "a.png", "text": "\\udfff"}\n'
                     + b'{"image": "a.png", "text": "\\u200b"}\n')
    summary = filter_manifest(path, tmp_path / "kept.jsonl", tmp_path / "rej.jsonl")
    assert summary.read == 4 and summary.kept == 1
    assert not list(tmp_path.glob("*.tmp"))
    rejected = [json.loads(line) for line in (tmp_path / "rej.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["reject_reason"] for r in rejected] == ["bad_line(not JSON)", "bad_line(not UTF-8)", "bad_line(no text)"]


@pytest.fixture(scope="module")
def vq_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("vq"), tiny_vq_config())


@pytest.mark.parametrize("content, bad", [(b"", 0), (b"not json\n{}\n", 2)], ids=["empty", "all-bad-lines"])
def test_tokenize_images_on_a_manifest_without_usable_pairs_exits_2(tmp_path, vq_ckpt, content, bad):
    (tmp_path / "m.jsonl").write_bytes(content)
    proc = run_cli("tools/tokenize_images.py", "--ckpt", str(vq_ckpt), "--manifest", str(tmp_path / "m.jsonl"),
                   "--out", str(tmp_path / "tok"))
    assert_one_line_error(proc, "m.jsonl", "no usable image-text pair", f"{bad} bad lines", skipped_lines=bad)
    assert not (tmp_path / "tok" / "info.json").exists()


def test_tokenize_images_when_every_image_is_bad_exits_2(tmp_path, vq_ckpt):
    (tmp_path / "bad.png").write_bytes(b"junk")
    (tmp_path / "m.jsonl").write_text('{"image": "bad.png", "text": "红"}\n', encoding="utf-8")
    proc = run_cli("tools/tokenize_images.py", "--ckpt", str(vq_ckpt), "--manifest", str(tmp_path / "m.jsonl"),
                   "--out", str(tmp_path / "tok"), "--workers", "1")
    assert_one_line_error(proc, "no usable image-text pair", "1 bad images", skipped_lines=1)


def test_parallel_tokenize_on_an_all_bad_manifest_raises_and_leaves_no_parts(tmp_path, vq_ckpt):
    from ernie_vilg.vq.parallel_tokenize import tokenize_manifest_parallel

    (tmp_path / "m.jsonl").write_text("nope\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="no usable image-text pair"):
        tokenize_manifest_parallel(vq_ckpt, tmp_path / "m.jsonl", tmp_path / "tok", workers=1)
    assert not (tmp_path / "tok" / "info.json").exists() and not list((tmp_path / "tok").glob("_part-*"))


@pytest.mark.parametrize("content, bad", [(b"", 0), (b'{"image": "a.png", "text": "\\u200b"}\n', 1)],
                         ids=["empty", "zero-width"])
def test_build_vocab_on_a_manifest_without_text_exits_2(tmp_path, content, bad):
    (tmp_path / "m.jsonl").write_bytes(content)
    proc = run_cli("tools/build_vocab.py", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "v.txt"))
    assert_one_line_error(proc, "no text to build a vocab from", skipped_lines=bad)
    assert not (tmp_path / "v.txt").exists()


def test_token_shard_text_write_that_fails_leaves_no_tmp(tmp_path):
    from ernie_vilg.data.token_shards import _atomic_write_text

    with pytest.raises(UnicodeEncodeError):
        _atomic_write_text(tmp_path / "x.jsonl", "\ud800")
    assert list(tmp_path.iterdir()) == []


def test_a_good_image_manifest_still_batches(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"image": "a.png", "text": "red"}\n')
    batch = next(iter(ImageBatches(tmp_path / "m.jsonl", 16, batch_size=2)))
    assert batch["images"].shape == (2, 3, 16, 16)
