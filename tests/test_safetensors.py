"""Safe weights: safetensors export / import is bit-exact for every dtype a model uses; pickles from
outside go through the restricted unpickler and a crafted malicious one is refused (library and CLI)."""
from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import pytest

from ernie_vilg.config import Config, load_config
from ernie_vilg.safetensors_file import SafetensorsError, load_safetensors, save_safetensors
from ernie_vilg.convert.safetensors_io import checkpoint_from_safetensors, checkpoint_to_safetensors
from ernie_vilg.safe_pickle import UnsafePickleError, safe_load
from ernie_vilg.checkpoint_io import CheckpointError, load_model_state, resolve_checkpoint, save_checkpoint, save_weights

REPO = Path(__file__).resolve().parents[1]
SIZES = ["Model.text_vocab_size=24", "Model.image_vocab_size=32", "Model.image_grid=4", "Model.max_text_len=16",
         "Data.max_text_len=16"]


# --------------------------------------------------------------------------------------------
# helpers (also used by test_export.py and test_bad_inputs.py)
# --------------------------------------------------------------------------------------------
def tiny_vilg_config(*overrides: str) -> Config:
    return load_config(REPO / "configs" / "vilg" / "tiny.yaml", SIZES + list(overrides))


def tiny_vq_config(*overrides: str) -> Config:
    return load_config(REPO / "configs" / "vq" / "tiny_vqvae.yaml", list(overrides))


def make_checkpoint(root: Path, cfg: Config, seed: int = 0, step: int = 3) -> Path:
    """A checkpoint folder of the bare model of `cfg`'s stage (random weights), as the Trainer
    writes it; a vilg checkpoint gets vocab.txt and an image_tokenizer/ sub-checkpoint."""
    from ernie_vilg.convert.safetensors_io import build_model_for

    paddle.seed(seed)
    model = build_model_for(cfg)

    def extras(folder: Path) -> None:
        if cfg.Global.stage == "vilg":
            (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n红\n", encoding="utf-8")
            make_checkpoint(folder, tiny_vq_config(), seed + 1, step).rename(folder / "image_tokenizer")

    return save_checkpoint(root, step, cfg, model.state_dict(), meta={"stage": cfg.Global.stage}, extras=extras)


def same_bits(a: Any, b: Any) -> bool:
    a = a.numpy() if isinstance(a, paddle.Tensor) else a
    b = b.numpy() if isinstance(b, paddle.Tensor) else b
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


class Evil:
    """Unpickling this runs `touch <marker>`: what a booby-trapped weight file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_evil_pdparams(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"w": (np.zeros(2, dtype="float32"),), "x": Evil(marker)}, protocol=4))
    return path


def write_evil_torch_zip(path: Path, marker: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil(marker)}, protocol=2))
    return path


# --------------------------------------------------------------------------------------------
# exact round trips
# --------------------------------------------------------------------------------------------
def test_every_dtype_round_trips_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.normal(size=(3, 5)).astype("float32")
    f32[0, :3] = [np.nan, -0.0, np.inf]  # special values keep their bits
    state = {
        "f32": paddle.to_tensor(f32),
        "f16": paddle.to_tensor(f32).astype("float16"),
        "bf16": paddle.to_tensor(f32).astype("bfloat16"),
        "f64": paddle.to_tensor(rng.normal(size=(4,))),
        "i64": paddle.to_tensor(np.array([-(2 ** 62), 0, 7], dtype="int64")),
        "i32": paddle.to_tensor(np.array([[1, -2]], dtype="int32")),
        "i8": paddle.to_tensor(np.array([-128, 127], dtype="int8")),
        "u8": paddle.to_tensor(np.array([0, 255], dtype="uint8")),
        "flag": paddle.to_tensor(np.array([True, False])),
        "scalar": paddle.to_tensor(np.float32(2.5)),
        "empty": paddle.zeros([0, 3]),
        "numpy_f16": rng.normal(size=(2, 2)).astype("float16"),
    }
    path = save_safetensors(state, tmp_path / "w.safetensors", {"note": "x"})
    loaded, meta = load_safetensors(path)
    assert meta == {"note": "x"} and sorted(loaded) == sorted(state)  # the file orders by dtype
    for key, value in state.items():
        assert same_bits(loaded[key], value), key
    assert str(loaded["bf16"].dtype) == "paddle.bfloat16" and str(loaded["f16"].dtype) == "paddle.float16"


def test_checkpoint_folder_round_trip_is_exact_with_extras_and_sub_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpts", tiny_vilg_config())
    exported = checkpoint_to_safetensors(ckpt, tmp_path / "export")
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["config.yaml", "image_tokenizer", "meta.json", "model.safetensors", "vocab.txt"]
    assert not list(exported.rglob("*.pd*"))  # no pickle travels with the export
    back = checkpoint_from_safetensors(exported, tmp_path / "back")
    assert resolve_checkpoint(back) == back
    for folder_a, folder_b in ((ckpt, back), (ckpt / "image_tokenizer", back / "image_tokenizer")):
        a, b = load_model_state(folder_a), load_model_state(folder_b)
        assert list(a) == list(b) and all(same_bits(a[k], b[k]) for k in a)
    assert (back / "vocab.txt").read_text(encoding="utf-8") == (ckpt / "vocab.txt").read_text(encoding="utf-8")


def test_single_file_carries_its_config_and_half_precision_weights_stay_exact(tmp_path):
    """AMP O2 checkpoints hold bfloat16 / float16 weights: they are exported as such."""
    cfg = tiny_vq_config()
    ckpt = make_checkpoint(tmp_path / "ckpts", cfg)
    state = load_model_state(ckpt)
    half = {k: (v.astype("bfloat16") if i % 2 else v.astype("float16")) if v.dtype == paddle.float32 else v
            for i, (k, v) in enumerate(state.items())}
    save_weights(ckpt, half)
    tool = load_tool("convert_checkpoint")
    assert tool.main(["to-safetensors", "--ckpt", str(ckpt), "--out", str(tmp_path / "vq.safetensors")]) == 0
    assert tool.main(["from-safetensors", "--in", str(tmp_path / "vq.safetensors"), "--out", str(tmp_path / "vq")]) == 0
    back = load_model_state(tmp_path / "vq")
    assert all(same_bits(back[k], half[k]) for k in half)


def test_weights_of_another_config_shape_are_refused_naming_the_key(tmp_path):
    exported = checkpoint_to_safetensors(make_checkpoint(tmp_path / "c", tiny_vq_config()), tmp_path / "vq.safetensors")
    other = tmp_path / "other.yaml"
    other.write_text(f"_base_: {REPO / 'configs' / 'vq' / 'tiny_vqvae.yaml'}\nVQ:\n  codebook_size: 64\n")
    with pytest.raises(CheckpointError, match=r"quantizer\.\S+ has shape \[32(, 8)?\] in the checkpoint but \[64"):
        checkpoint_from_safetensors(exported, tmp_path / "out", other)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = save_safetensors({"w": paddle.ones([64])}, tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SafetensorsError, match=r"w\.safetensors: not a valid safetensors file"):
        load_safetensors(path)


# --------------------------------------------------------------------------------------------
# malicious pickles
# --------------------------------------------------------------------------------------------
def test_malicious_paddle_pickle_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = write_evil_pdparams(tmp_path / "model.pdparams", marker)
    with pytest.raises(UnsafePickleError, match=r"model\.pdparams: refusing global '(posix|os)\.system'"):
        safe_load(evil)
    assert not marker.exists()
    # a genuine Paddle file (tensors, bfloat16, RNG state) passes the same check
    paddle.save({"w": paddle.ones([2]), "b": paddle.ones([2]).astype("bfloat16"), "rng": paddle.get_rng_state()},
                str(tmp_path / "ok.pd"))
    assert same_bits(safe_load(tmp_path / "ok.pd")["w"], paddle.ones([2]))


def test_cli_refuses_malicious_pickles_with_one_line_and_exit_2(tmp_path):
    marker = tmp_path / "pwned"
    evil_pt = write_evil_torch_zip(tmp_path / "evil.pt", marker)
    proc = run_tool("tools/convert_checkpoint.py", "inspect", "--in", str(evil_pt))
    assert proc.returncode == 2 and not marker.exists()
    line, = proc.stderr.strip().splitlines()
    assert "evil.pt" in line and "refusing global" in line and "system" in line
    # a checkpoint folder whose model.pdparams is booby-trapped (e.g. downloaded) is refused on export
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    write_evil_pdparams(ckpt / "model.pdparams", marker)
    (ckpt / "config.yaml").write_text("Global:\n  stage: vq\n")
    (ckpt / "meta.json").write_text("{}")
    proc = run_tool("tools/convert_checkpoint.py", "to-safetensors", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and not marker.exists()
    line, = proc.stderr.strip().splitlines()
    assert "model.pdparams" in line and "refusing global" in line
