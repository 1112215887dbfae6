"""The bad-input suite: one case per kind of bad input, each handled exactly as docs/reliability.md
says: a clear one-line error naming the thing (file, line, key), or skipped and counted, or
accepted after a documented conversion. Never a bare traceback from deep inside Paddle: command-line
cases run the tool in a subprocess and check exit code 2 and a single stderr line."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_safetensors import make_checkpoint, tiny_vq_config  # noqa: E402
from vilg_fixture import write_tiny_vilg_data  # noqa: E402

from ernie_vilg.config import ConfigError, load_config, save_config  # noqa: E402
from ernie_vilg.data.images import MAX_IMAGE_PIXELS, ImageBatches, ImageError, load_image  # noqa: E402
from ernie_vilg.data.manifest import ManifestError, ManifestStats, iter_manifest, read_manifest  # noqa: E402
from ernie_vilg.data.token_shards import TokenShardError, TokenShards, TokenShardWriter  # noqa: E402
from ernie_vilg.checkpoint_io import CheckpointError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def run_tool(*args: str) -> tuple[int, list[str]]:
    """Exit code and the non-empty stderr lines of a tool run in its own process."""
    # no PYTHONWARNINGS here: stderr must be one line in the environment CI really has
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def assert_image_loads(path: Path) -> np.ndarray:
    arr = load_image(path, SIZE)
    assert arr.shape == (3, SIZE, SIZE) and arr.dtype == np.float32
    assert np.isfinite(arr).all() and arr.min() >= -1.0 and arr.max() <= 1.0
    return arr


# --------------------------------------------------------------------------------------------
# images: strict loading raises ImageError naming the file; odd but valid modes are converted
# --------------------------------------------------------------------------------------------
def test_corrupt_image_bytes(tmp_path):
    path = tmp_path / "corrupt.png"
    Image.new("RGB", (32, 32), "red").save(path)
    path.write_bytes(path.read_bytes()[:60])  # a truncated PNG
    with pytest.raises(ImageError, match=r"corrupt\.png: cannot decode image"):
        load_image(path, SIZE)


def test_zero_byte_image_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: image file is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.jpg", SIZE)


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageError, match=r"nowhere\.png: image file not found"):
        load_image(tmp_path / "nowhere.png", SIZE)


def test_directory_instead_of_image_file(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match=r"folder\.png: is a directory, not an image file"):
        load_image(tmp_path / "folder.png", SIZE)


def test_cmyk_image_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (20, 24), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    arr = assert_image_loads(tmp_path / "cmyk.jpg")
    assert arr[0].mean() > 0.8 and arr[1].mean() < -0.6  # red channel high, green low


def test_palette_image_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0  # palette entry 0 (black) is fully transparent
    img.save(tmp_path / "palette.png", transparency=0)
    assert np.allclose(assert_image_loads(tmp_path / "palette.png"), 1.0)  # white, not black


def test_la_greyscale_alpha_image(tmp_path):
    Image.new("LA", (20, 20), (0, 0)).save(tmp_path / "la.png")  # black, fully transparent
    assert np.allclose(assert_image_loads(tmp_path / "la.png"), 1.0)


def test_16_bit_image_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode in ("I;16", "I")  # 16 bits per pixel on disk
    arr = assert_image_loads(tmp_path / "deep.png")
    assert arr[:, :, 0].mean() < -0.8 and arr[:, :, -1].mean() > 0.8  # full range kept
    assert abs(float(arr.mean())) < 0.2  # clipping at 255 would make almost everything white


def test_one_pixel_image_is_upscaled(tmp_path):
    Image.new("RGB", (1, 1), (0, 0, 255)).save(tmp_path / "dot.png")
    arr = assert_image_loads(tmp_path / "dot.png")
    assert np.allclose(arr[2], 1.0) and np.allclose(arr[0], -1.0)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (a decompression bomb's header) in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_enormous_image_is_refused_by_the_decompression_bomb_guard(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert 20000 * 20000 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=r"bomb\.png: .*decompression-bomb guard"):
        load_image(tmp_path / "bomb.png", SIZE)


def test_bad_image_inside_a_manifest_is_skipped_and_counted(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"not a png at all")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "text": "红"}) + "\n" for i in range(3)))
    batches = ImageBatches(tmp_path / "m.jsonl", SIZE, batch_size=4, shuffle=False)
    batch = next(iter(batches))
    assert len(batch["images"]) == 4 and str(tmp_path / "1.png") not in batch["paths"]
    assert batches.skipped == 2  # the bad image came up twice in 6 visits; each visit counted


# --------------------------------------------------------------------------------------------
# manifests: bad lines are skipped and counted by reason; strict mode names file:line
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, reason", [
    (b'{"image": "a.png", "text": "ok"', "not valid JSON"),
    (b'{"text": "a red circle"}', "missing or empty 'image' field"),
    (b'{"image": "a.png"}', "missing 'text' field"),
    (b'{"image": "a.png", "text": "  \\t "}', "'text' is empty or whitespace only"),
    (b'{"image": "a.png", "text": "\xff\xfe red"}', "not UTF-8"),
], ids=["not-json", "lacks-image", "lacks-text", "whitespace-text", "non-utf8"])
def test_bad_manifest_line(tmp_path, raw, reason):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"image": "a.png", "text": "good"}\n' + raw + b"\n")
    stats = ManifestStats()
    records = list(iter_manifest(path, stats=stats))
    assert [r.text for r in records] == ["good"] and stats.skipped == 1
    assert list(stats.reasons) == [reason.split(" (")[0]]
    with pytest.raises(ManifestError, match=rf"m\.jsonl:2: {reason}"):
        read_manifest(path, strict=True)


def test_manifest_without_a_single_usable_line_stops_with_a_manifest_error(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(b"not json\n{}\n")
    with pytest.raises(ManifestError, match=r"all_bad\.jsonl: manifest has no usable records"):
        ImageBatches(path, SIZE, batch_size=2)


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    from ernie_vilg.text.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("vocab")
    write_tiny_vilg_data(root, items=2)
    return TextTokenizer(root / "vocab.txt")


def test_text_far_longer_than_the_model_limit_is_truncated(text_tokenizer):
    ids = text_tokenizer.encode("红" * 10_000, max_len=16)
    assert len(ids) == 16 and ids[0] == text_tokenizer.cls_id and ids[-1] == text_tokenizer.sep_id


def test_unknown_characters_fall_back_to_unk(text_tokenizer):
    ids = text_tokenizer.encode("红龘😀", max_len=16)
    assert ids[1] != text_tokenizer.unk_id and ids[2] == text_tokenizer.unk_id
    assert text_tokenizer.decode(ids).startswith("红[UNK]")


# --------------------------------------------------------------------------------------------
# token shards
# --------------------------------------------------------------------------------------------
def _shards(tmp_path: Path) -> Path:
    writer = TokenShardWriter(tmp_path / "shards", grid=4, codebook_size=32)
    for i in range(3):
        writer.add(np.full((4, 4), i), "红", ["红"], {"image": f"{i}.png"})
    writer.close()
    return tmp_path / "shards"


def test_token_shard_of_the_wrong_dtype(tmp_path):
    shards = _shards(tmp_path)
    np.save(shards / "shard-00000.npy", np.zeros((3, 4, 4), dtype=np.int64))
    with pytest.raises(TokenShardError, match=r"shard-00000\.npy: dtype int64, expected uint16"):
        TokenShards(shards)


def test_token_shard_of_the_wrong_shape(tmp_path):
    shards = _shards(tmp_path)
    np.save(shards / "shard-00000.npy", np.zeros((3, 5, 5), dtype=np.uint16))
    with pytest.raises(TokenShardError, match=r"shard-00000\.npy: shape \(3, 5, 5\), expected \(3, 4, 4\)"):
        TokenShards(shards)


# --------------------------------------------------------------------------------------------
# configs (command line: exit 2, one line naming the key)
# --------------------------------------------------------------------------------------------
def test_config_with_an_unknown_key(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(f"_base_: {REPO / 'configs' / 'vq' / 'tiny_vqvae.yaml'}\nTrain:\n  max_step: 10\n")
    code, err = run_tool("tools/train.py", "-c", str(cfg))
    assert code == 2 and len(err) == 1, err
    assert "typo.yaml" in err[0] and "unknown key Train.max_step" in err[0]


def test_config_value_of_the_wrong_type(tmp_path):
    code, err = run_tool("tools/train.py", "-c", str(REPO / "configs" / "vq" / "tiny_vqvae.yaml"),
                         "-o", "Data.batch_size=four")
    assert code == 2 and len(err) == 1, err
    assert "Data.batch_size: expected int, got 'four'" in err[0]


def test_config_with_an_impossible_topology():
    from ernie_vilg.training.distributed import validate

    cfg = load_config(None, ["Distributed.dp_degree=2", "Distributed.sharding_degree=3"])
    with pytest.raises(ConfigError, match=r"= 6, but 2 process\(es\)"):
        validate(cfg, 2, "cpu")


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def test_checkpoint_folder_missing_a_file(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpts", tiny_vq_config())
    (ckpt / "config.yaml").unlink()
    code, err = run_tool("tools/export.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1, err
    assert str(ckpt) in err[0] and "incomplete checkpoint, missing config.yaml" in err[0]


def test_checkpoint_from_a_different_config_shape(tmp_path):
    from ernie_vilg.vq.registry import load_tokenizer

    ckpt = make_checkpoint(tmp_path / "ckpts", tiny_vq_config())
    save_config(tiny_vq_config("VQ.embed_dim=16"), ckpt / "config.yaml")  # config no longer matches
    with pytest.raises(CheckpointError, match=r"has shape \[.*\] in the checkpoint but \[.*\] in the model"):
        load_tokenizer(ckpt)


def test_truncated_checkpoint_weights(tmp_path):
    from ernie_vilg.vq.registry import load_tokenizer

    ckpt = make_checkpoint(tmp_path / "ckpts", tiny_vq_config())
    weights = ckpt / "model-00001-of-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors: not a valid safetensors file"):
        load_tokenizer(ckpt)
