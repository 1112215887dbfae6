import json

import numpy as np
import pytest
from PIL import Image

from ernie_vilg.data.images import ImageBatches, ImageError, load_image, to_rgb
from ernie_vilg.data.manifest import ManifestError, read_manifest


def rgb_pattern(w=40, h=30):
    x = np.zeros((h, w, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, w)[None, :]
    x[..., 1] = np.linspace(0, 255, h)[:, None]
    x[..., 2] = 128
    return Image.fromarray(x, "RGB")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB"])
def test_every_mode_becomes_rgb_and_normalized(tmp_path, mode):
    img = rgb_pattern()
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), np.uint16) * 257)
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16")
    else:
        img = img.convert(mode)
    ext = "tiff" if mode == "CMYK" else "png"
    path = tmp_path / f"x.{ext}"
    img.save(path)
    out = load_image(path, 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    # content survives: not a constant image
    assert out.std() > 0.05


def test_sixteen_bit_uses_full_range():
    arr = np.full((4, 4), 65535, np.uint16)
    rgb = to_rgb(Image.fromarray(arr))
    assert rgb.mode == "RGB" and np.asarray(rgb).min() == 255


def test_transparent_pixels_composite_on_white():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert tuple(np.asarray(to_rgb(rgba))[0, 0]) == (255, 255, 255)


def test_center_crop_keeps_the_middle(tmp_path):
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # the central square is white, the sides black
    Image.fromarray(arr).save(tmp_path / "w.png")
    out = load_image(tmp_path / "w.png", 10)
    assert out.min() > 0.9


def test_bad_files_raise_naming_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (tmp_path / "adir.png").mkdir()
    good = tmp_path / "good.png"
    rgb_pattern().save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    for name, reason in [("missing.png", "not found"), ("empty.png", "empty"),
                         ("corrupt.png", "cannot decode"), ("adir.png", "directory"),
                         ("truncated.png", "cannot decode")]:
        with pytest.raises(ImageError) as exc:
            load_image(tmp_path / name, 8)
        assert name in str(exc.value) and reason in str(exc.value)


def test_iteration_skips_and_counts_bad_images(tmp_path):
    rgb_pattern().save(tmp_path / "a.png")
    rgb_pattern(20, 20).save(tmp_path / "b.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    lines = [{"image": "a.png", "text": "一"}, {"image": "bad.png", "text": "二"},
             {"image": "missing.png", "text": "三"}, {"image": "b.png", "text": "四"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(l, ensure_ascii=False) for l in lines))
    batches = ImageBatches(tmp_path / "m.jsonl", 8, batch_size=2, seed=0, shuffle=False)
    batch = next(iter(batches))
    assert batch["images"].shape == (2, 3, 8, 8)
    assert [p.rsplit("/", 1)[-1] for p in batch["paths"]] == ["a.png", "b.png"]
    assert batches.skipped == 2


def test_batches_resume_exactly_and_partition_ranks(tmp_path):
    lines = []
    for i in range(7):
        rgb_pattern(10 + i, 12).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": str(i)}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    a = ImageBatches(tmp_path / "m.jsonl", 8, batch_size=3, seed=5)
    it = iter(a)
    next(it)
    state = a.state_dict()
    expected = [next(it)["paths"] for _ in range(4)]
    b = ImageBatches(tmp_path / "m.jsonl", 8, batch_size=3, seed=5)
    b.set_state_dict(state)
    it_b = iter(b)
    assert [next(it_b)["paths"] for _ in range(4)] == expected
    r0 = ImageBatches(tmp_path / "m.jsonl", 8, 1, seed=1, rank=0, world_size=2)
    r1 = ImageBatches(tmp_path / "m.jsonl", 8, 1, seed=1, rank=1, world_size=2)
    s0, s1 = set(r0._order(0).tolist()), set(r1._order(0).tolist())
    assert not (s0 & s1) and len(s0 | s1) == 7


def test_manifest_bad_lines_skipped_or_strict(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b'{"image": "a.png", "text": "ok"}\n'
        b"not json\n"
        b'{"text": "no image"}\n'
        b'{"image": "b.png", "text": "   "}\n'
        b'{"image": "c.png", "text": "\xff\xfe"}\n'
        b'{"image": "d.png", "texts": ["ref a", "ref b"]}\n'
    )
    recs = read_manifest(path)
    assert [r.text for r in recs] == ["ok", "ref a"]
    assert recs[1].texts == ["ref a", "ref b"]
    assert recs[0].image_path == str(tmp_path / "a.png")
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not valid JSON"):
        read_manifest(path, strict=True)
