"""Hostile files from outside (issue 21): a booby-trapped FID weights file, a zip bomb, a
safetensors tensor whose dtype label lies. Each is refused with one line and runs nothing."""
from __future__ import annotations

import json
import struct
import sys
import time
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_helpers import assert_one_line_error, run_cli  # noqa: E402
from test_safetensors import make_checkpoint, tiny_vq_config, write_evil_pdparams  # noqa: E402

from ernie_vilg.convert.torch_pickle import CheckpointFormatError, load_torch_zip  # noqa: E402
from ernie_vilg.safe_pickle import UnsafePickleError  # noqa: E402


def test_fid_weights_file_that_runs_code_is_refused_by_the_library(tmp_path):
    from ernie_vilg.metrics.fid import load_fid_inception
    from ernie_vilg.metrics.fid import WEIGHTS_FILE

    marker = tmp_path / "pwned"
    write_evil_pdparams(tmp_path / WEIGHTS_FILE, marker)
    with pytest.raises(UnsafePickleError, match=r"refusing global 'posix.system'|refusing global 'os.system'"):
        load_fid_inception(tmp_path)
    assert not marker.exists()


def test_eval_fid_refuses_a_malicious_weights_folder_with_one_line(tmp_path):
    from PIL import Image

    from ernie_vilg.metrics.fid import WEIGHTS_FILE

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights"
    weights.mkdir()
    write_evil_pdparams(weights / WEIGHTS_FILE, marker)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 90, 0, 0)).save(images / f"{i}.png")
    proc = run_cli("tools/eval_fid.py", str(images), str(images), "--weights", str(weights), "--no-progress")
    assert_one_line_error(proc, "refusing global", WEIGHTS_FILE)
    assert not marker.exists()


def write_zip_bomb(path: Path, inflated_mb: int = 100) -> Path:
    """A torch-style zip whose storage member inflates ~1000x (zeros, deflated)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")  # an empty dict
        with zf.open("archive/data/0", "w") as fh:
            block = b"\0" * (1 << 20)
            for _ in range(inflated_mb):
                fh.write(block)
    return path


def test_zip_bomb_is_refused_before_any_member_is_read(tmp_path):
    bomb = write_zip_bomb(tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 1 << 20
    t0 = time.time()
    with pytest.raises(CheckpointFormatError, match=r"refusing a possible zip bomb"):
        load_torch_zip(bomb)
    assert time.time() - t0 < 2


def test_inspect_tool_refuses_a_zip_bomb_with_one_line(tmp_path):
    bomb = write_zip_bomb(tmp_path / "bomb.pt")
    proc = run_cli("tools/convert_checkpoint.py", "inspect", "--in", str(bomb))
    assert_one_line_error(proc, "bomb.pt", "zip bomb")


def test_a_normal_torch_zip_is_within_the_limit(tmp_path):
    import numpy as np
    from torch_format import write_torch_zip  # the tests' own torch.save look-alike

    path = write_torch_zip(tmp_path / "ok.pt", {"w": np.ones((64, 64), dtype="float32")})
    assert load_torch_zip(path)["w"].shape == (64, 64)


def relabel_first_tensor(path: Path, old: str, new: str) -> str:
    """Rewrite the dtype label of the first tensor stored as `old` (same-length names keep the
    header size, so the file stays valid safetensors with a lying label)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == old)
    header[name]["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    return name


def test_safetensors_tensor_with_a_lying_dtype_label_is_refused_at_import(tmp_path):
    from ernie_vilg.safetensors_file import SafetensorsError
    from ernie_vilg.convert.safetensors_io import checkpoint_from_safetensors, checkpoint_to_safetensors

    ckpt = make_checkpoint(tmp_path / "ckpts", tiny_vq_config())
    st = checkpoint_to_safetensors(ckpt, tmp_path / "vq.safetensors")
    name = relabel_first_tensor(st, "F32", "I32")
    with pytest.raises(SafetensorsError, match=rf"tensor {name} is stored as int32, the model's is float32"):
        checkpoint_from_safetensors(st, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()
