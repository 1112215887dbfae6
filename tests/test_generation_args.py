"""Generation tools with unusable arguments (issue 21): one line and exit code 2, before the model
loads where the arguments alone show the problem; an existing --out needs --overwrite."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_helpers import assert_one_line_error, run_cli  # noqa: E402
from test_safetensors import make_checkpoint, tiny_vilg_config, tiny_vq_config  # noqa: E402


@pytest.fixture(scope="module")
def vilg_ckpt(tmp_path_factory) -> Path:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("vilg"), tiny_vilg_config())
    (ckpt / "vilg.json").write_text('{"image_tokenizer": "image_tokenizer"}')  # as save_extras writes it
    return ckpt


def generate(ckpt: Path, out: Path, *extra: str, text: str = "一个红色的圆形"):
    return run_cli("tools/generate.py", "--ckpt", str(ckpt), "--text", text, "--out", str(out), *extra)


@pytest.mark.parametrize("n", ["0", "-3"])
def test_num_candidates_below_one(tmp_path, n):
    proc = generate(tmp_path / "no-such-ckpt", tmp_path / "out", "--num-candidates", n)
    assert_one_line_error(proc, f"--num-candidates must be >= 1, got {n}")


def test_keep_above_num_candidates(tmp_path):
    proc = generate(tmp_path / "ckpt", tmp_path / "out", "--num-candidates", "2", "--keep", "3")
    assert_one_line_error(proc, "--keep must be between 0")


@pytest.mark.parametrize("text", ["", "   ", "\u200b"], ids=["empty", "spaces", "zero-width"])
def test_empty_text(tmp_path, text):
    assert_one_line_error(generate(tmp_path / "ckpt", tmp_path / "out", text=text), "--text number 1 is empty")


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "out.png").write_bytes(b"x")
    assert_one_line_error(generate(tmp_path / "ckpt", tmp_path / "out.png"), "is a file, not a folder")


def test_out_under_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    assert_one_line_error(generate(tmp_path / "ckpt", tmp_path / "file" / "sub" / "out"),
                          "is a file, so no folder can be made under it")


def test_out_in_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits: a read-only kernel folder instead
        ro = Path("/proc/sys")
        if os.access(ro, os.W_OK):
            pytest.skip("no read-only folder available")
    try:
        assert_one_line_error(generate(tmp_path / "ckpt", ro / "ernie_vilg_out"), "is not writable")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_existing_out_needs_overwrite_then_is_written(tmp_path, vilg_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"an earlier run")
    assert_one_line_error(generate(vilg_ckpt, out), "already holds files; pass --overwrite")
    assert (out / "00000.png").read_bytes() == b"an earlier run"
    proc = generate(vilg_ckpt, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "00000.png").read_bytes()[:4] == b"\x89PNG" and (out / "grid.png").is_file()


def test_ckpt_pointing_at_an_image_tokenizer_says_what_it_is(tmp_path):
    vq = make_checkpoint(tmp_path / "vq", tiny_vq_config())
    proc = generate(vq, tmp_path / "out")
    assert_one_line_error(proc, "an image tokenizer checkpoint (Global.stage vq), not an ERNIE-ViLG one")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(image)
    proc = run_cli("tools/caption.py", "--ckpt", str(vq), "--image", str(image))
    assert_one_line_error(proc, "an image tokenizer checkpoint")


def test_num_candidates_defaults_to_the_checkpoints_generation_setting(tmp_path):
    """Generation.num_candidates (60 in the 10B config) is --num-candidates' default."""
    from ernie_vilg.cli.common import checkpoint_num_candidates

    ckpt = make_checkpoint(tmp_path / "three", tiny_vilg_config("Generation.num_candidates=3"))
    (ckpt / "vilg.json").write_text('{"image_tokenizer": "image_tokenizer"}')
    assert checkpoint_num_candidates(ckpt) == 3
    assert checkpoint_num_candidates(tmp_path / "missing") == 1
    # --keep is checked against the default before the model loads
    assert_one_line_error(generate(ckpt, tmp_path / "bad", "--keep", "4"), "--num-candidates (3), got 4")
    proc = generate(ckpt, tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("00000_*.png")) == [f"00000_{k}.png" for k in range(3)]
    proc = generate(ckpt, tmp_path / "one", "--no-progress", "--num-candidates", "1")  # the flag still wins
    assert proc.returncode == 0 and (tmp_path / "one" / "00000.png").is_file()
