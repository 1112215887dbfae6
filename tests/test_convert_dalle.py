"""OpenAI DALL-E dVAE pickles (whole pickled nn.Modules) -> our DVAE, read without torch and
without instantiating dall_e classes; refusal of anything outside the allow-list."""
from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import paddle
import pytest

from ernie_vilg.convert.dalle import ModuleSkeleton, convert_dalle, load_module_pickle, module_tensors
from ernie_vilg.safe_pickle import UnsafePickleError
from ernie_vilg.checkpoint_io import load_checkpoint_config, load_model_state, set_model_state
from ernie_vilg.vq.dvae import DVAE
from torch_format import Call, Global, module, write_torch_zip

N_HID, N_BLK, GROUPS, VOCAB, N_INIT = 16, 1, 2, 32, 8  # DALL-E: 256, 2, 4, 8192, 128


def _conv(rng, n_in: int, n_out: int, kw: int, name: str = "dall_e.utils.Conv2d"):
    w = (rng.standard_normal((n_out, n_in, kw, kw)) / np.sqrt(n_in * kw * kw)).astype(np.float32)
    b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    return module(name, {"w": w, "b": b}, n_in=n_in, n_out=n_out, kw=kw, use_float16=True,
                  device=Call(Global("torch", "device"), "cuda", 0), requires_grad=False)


def _block(rng, kind: str, n_in: int, n_out: int, kernels):
    n_hid = n_out // 4
    widths = [n_in, n_hid, n_hid, n_hid, n_out]
    res = {}
    for i, kw in enumerate(kernels):
        res[f"relu_{i + 1}"] = module("torch.nn.modules.activation.ReLU", inplace=False)
        res[f"conv_{i + 1}"] = _conv(rng, widths[i], widths[i + 1], kw)
    id_path = _conv(rng, n_in, n_out, 1) if n_in != n_out else module("torch.nn.modules.linear.Identity")
    return module(f"dall_e.{kind}.{kind.capitalize()}Block",
                  children={"id_path": id_path, "res_path": module("torch.nn.modules.container.Sequential", children=res)},
                  n_in=n_in, n_out=n_out, n_layers=GROUPS * N_BLK, n_hid=n_hid, post_gain=1.0 / (GROUPS * N_BLK) ** 2)


def dalle_modules(seed: int = 0):
    """Encoder / Decoder module trees as dall_e pickles them (names, classes, attributes)."""
    rng = np.random.default_rng(seed)
    seq = "torch.nn.modules.container.Sequential"
    enc = {"input": _conv(rng, 3, N_HID, 7)}
    n_in = N_HID
    for g in range(GROUPS):
        width = N_HID * 2 ** g
        grp = {}
        for i in range(N_BLK):
            grp[f"block_{i + 1}"] = _block(rng, "encoder", n_in, width, (3, 3, 3, 1))
            n_in = width
        if g < GROUPS - 1:
            grp["pool"] = module("torch.nn.modules.pooling.MaxPool2d", kernel_size=2, stride=2, padding=0)
        enc[f"group_{g + 1}"] = module(seq, children=grp)
    enc["output"] = module(seq, children={"relu": module("torch.nn.modules.activation.ReLU"),
                                          "conv": _conv(rng, n_in, VOCAB, 1)})
    encoder = module("dall_e.encoder.Encoder", children={"blocks": module(seq, children=enc)},
                     n_hid=N_HID, n_blk_per_group=N_BLK, input_channels=3, vocab_size=VOCAB,
                     device=Call(Global("torch", "device"), "cpu"), requires_grad=False, use_mixed_precision=True)
    dec = {"input": _conv(rng, VOCAB, N_INIT, 1)}
    n_in = N_INIT
    for g in range(GROUPS):
        width = N_HID * 2 ** (GROUPS - 1 - g)
        grp = {}
        for i in range(N_BLK):
            grp[f"block_{i + 1}"] = _block(rng, "decoder", n_in, width, (1, 3, 3, 3))
            n_in = width
        if g < GROUPS - 1:
            grp["upsample"] = module("torch.nn.modules.upsampling.Upsample", scale_factor=2.0, mode="nearest")
        dec[f"group_{g + 1}"] = module(seq, children=grp)
    dec["output"] = module(seq, children={"relu": module("torch.nn.modules.activation.ReLU"),
                                          "conv": _conv(rng, n_in, 6, 1)})
    decoder = module("dall_e.decoder.Decoder", children={"blocks": module(seq, children=dec)},
                     n_init=N_INIT, n_hid=N_HID, n_blk_per_group=N_BLK, output_channels=3, vocab_size=VOCAB)
    return encoder, decoder


@pytest.fixture()
def pkls(tmp_path):
    encoder, decoder = dalle_modules()
    return write_torch_zip(tmp_path / "encoder.pkl", encoder), write_torch_zip(tmp_path / "decoder.pkl", decoder)


def test_module_pickles_read_into_inert_skeletons(pkls):
    enc = load_module_pickle(pkls[0])
    assert isinstance(enc, ModuleSkeleton) and enc.qualname == "dall_e.encoder.Encoder"
    assert enc.state["device"] == "cpu" and enc.state["_non_persistent_buffers_set"] == set()
    names = module_tensors(enc)
    assert "blocks.group_1.block_1.res_path.conv_4.w" in names and "blocks.output.conv.b" in names
    assert names["blocks.input.w"].shape == (N_HID, 3, 7, 7)


def test_convert_round_trip_every_key_and_shape(pkls, tmp_path):
    out = convert_dalle(*pkls, tmp_path / "dvae", image_size=16)
    ckpt, cfg = load_checkpoint_config(out)
    assert (cfg.VQ.kind, cfg.VQ.hidden_channels, cfg.VQ.channel_mult, cfg.VQ.codebook_size, cfg.VQ.embed_dim) == \
        ("dvae", N_HID, [1, 2], VOCAB, N_INIT)
    model = DVAE(cfg.VQ)
    set_model_state(model, load_model_state(ckpt), ckpt)
    src = {f"encoder.{k}": v for k, v in module_tensors(load_module_pickle(pkls[0])).items()}
    src.update({f"decoder.{k}": v for k, v in module_tensors(load_module_pickle(pkls[1])).items()})
    state = model.state_dict()
    assert set(src) == set(state)
    for k, v in src.items():
        np.testing.assert_array_equal(state[k].numpy(), v)


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    return path


def test_malicious_and_unlisted_globals_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("__import__('os').system('echo pwned > /tmp/pwned')",))

    path = _zip_with_pickle(tmp_path / "evil.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsafePickleError, match="eval"):
        load_module_pickle(path)
    # a module class that is not on the allow-list (could run code in __setstate__ / __init__)
    bad = module("dall_e.encoder.Encoder", children={"x": module("torch.nn.modules.conv.Conv2d")})
    with pytest.raises(UnsafePickleError, match="Conv2d"):
        load_module_pickle(write_torch_zip(tmp_path / "bad.pkl", bad))
    # torch.device with a non-string payload
    bad = module("dall_e.encoder.Encoder", device=Call(Global("torch", "device"), [1]))
    with pytest.raises(Exception):
        load_module_pickle(write_torch_zip(tmp_path / "bad2.pkl", bad))


def test_forward_matches_a_pytorch_implementation_of_dall_e(pkls, tmp_path):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as TF

    ckpt = convert_dalle(*pkls, tmp_path / "dvae", image_size=16)
    _, cfg = load_checkpoint_config(ckpt)
    model = DVAE(cfg.VQ)
    set_model_state(model, load_model_state(ckpt), ckpt)
    model.eval()
    we = {k: torch.from_numpy(v) for k, v in module_tensors(load_module_pickle(pkls[0])).items()}
    wd = {k: torch.from_numpy(v) for k, v in module_tensors(load_module_pickle(pkls[1])).items()}

    def conv(w, x, p):
        k = w[f"{p}.w"].shape[-1]
        return TF.conv2d(x, w[f"{p}.w"], w[f"{p}.b"], padding=(k - 1) // 2)

    def block(w, x, p):
        h = x
        for i in range(1, 5):
            h = conv(w, torch.relu(h), f"{p}.res_path.conv_{i}")
        skip = conv(w, x, f"{p}.id_path") if f"{p}.id_path.w" in w else x
        return skip + h / (GROUPS * N_BLK) ** 2

    x01 = torch.from_numpy(np.random.default_rng(3).uniform(0, 1, (2, 3, 16, 16)).astype(np.float32))
    h = conv(we, 0.8 * x01 + 0.1, "blocks.input")  # map_pixels
    for g in range(1, GROUPS + 1):
        h = block(we, h, f"blocks.group_{g}.block_1")
        if g < GROUPS:
            h = TF.max_pool2d(h, 2)
    logits = conv(we, torch.relu(h), "blocks.output.conv")
    ids = logits.argmax(1)
    h = conv(wd, TF.one_hot(ids, VOCAB).permute(0, 3, 1, 2).float(), "blocks.input")
    for g in range(1, GROUPS + 1):
        h = block(wd, h, f"blocks.group_{g}.block_1")
        if g < GROUPS:
            h = TF.interpolate(h, scale_factor=2, mode="nearest")
    stats = conv(wd, torch.relu(h), "blocks.output.conv")
    ref = torch.clamp((torch.sigmoid(stats[:, :3]) - 0.1) / 0.8, 0, 1)  # unmap_pixels

    images = paddle.to_tensor(x01.numpy() * 2 - 1)
    np.testing.assert_allclose(model.encoder_logits(images).numpy(), logits.numpy(), rtol=1e-4, atol=1e-5)
    ours_ids = model.encode_to_ids(images)
    np.testing.assert_array_equal(ours_ids.numpy(), ids.numpy())
    np.testing.assert_allclose((model.decode_ids(ours_ids).numpy() + 1) / 2, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_reads_a_module_pickled_by_real_torch(tmp_path, monkeypatch):
    """torch.save of a real nn.Module tree (stand-in dall_e classes registered under dall_e.*)."""
    torch = pytest.importorskip("torch")
    import sys
    import types
    from collections import OrderedDict

    nn = torch.nn
    utils, enc_mod = types.ModuleType("dall_e.utils"), types.ModuleType("dall_e.encoder")
    monkeypatch.setitem(sys.modules, "dall_e", types.ModuleType("dall_e"))
    monkeypatch.setitem(sys.modules, "dall_e.utils", utils)
    monkeypatch.setitem(sys.modules, "dall_e.encoder", enc_mod)

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw):
            super().__init__()
            self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw))
            self.b = nn.Parameter(torch.zeros(n_out))
            self.kw, self.device, self.use_float16 = kw, torch.device("cpu"), True

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(OrderedDict(input=Conv2d(3, 4, 7), group_1=nn.Sequential(
                OrderedDict(pool=nn.MaxPool2d(2))), output=nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(4, 8, 1)))))

    Conv2d.__module__, Encoder.__module__ = "dall_e.utils", "dall_e.encoder"
    Conv2d.__qualname__, Encoder.__qualname__ = "Conv2d", "Encoder"  # pickled by reference
    utils.Conv2d, enc_mod.Encoder = Conv2d, Encoder
    enc = Encoder()
    torch.save(enc, tmp_path / "encoder.pkl")
    tensors = module_tensors(load_module_pickle(tmp_path / "encoder.pkl"))
    assert set(tensors) == set(enc.state_dict())
    np.testing.assert_array_equal(tensors["blocks.input.w"], enc.state_dict()["blocks.input.w"].numpy())
