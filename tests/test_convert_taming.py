"""taming-transformers VQGAN checkpoints -> our VQGAN: key table, shapes, LPIPS extraction, and a
forward pass against an independent PyTorch implementation of taming's layout (torch optional)."""
from __future__ import annotations

import collections

import numpy as np
import paddle
import pytest

from ernie_vilg.convert.name_table import ConversionError
from ernie_vilg.convert.taming import KEEP_INIT, convert_taming, read_taming_state
from ernie_vilg.checkpoint_io import load_checkpoint_config, load_model_state, set_model_state
from ernie_vilg.vq.gan_losses import LPIPS
from ernie_vilg.vq.vqgan import VQGAN
from torch_format import write_torch_zip


# ----------------------------------------------------------------------------- the source format
def _resblock(p: str, cin: int, cout: int) -> dict[str, tuple]:
    t = {f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,), f"{p}.conv1.weight": (cout, cin, 3, 3),
         f"{p}.conv1.bias": (cout,), f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
         f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)}
    if cin != cout:
        t.update({f"{p}.nin_shortcut.weight": (cout, cin, 1, 1), f"{p}.nin_shortcut.bias": (cout,)})
    return t


def _attn(p: str, c: int) -> dict[str, tuple]:
    t = {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,)}
    for n in ("q", "k", "v", "proj_out"):
        t.update({f"{p}.{n}.weight": (c, c, 1, 1), f"{p}.{n}.bias": (c,)})
    return t


def taming_source_shapes(ch: int, ch_mult: list[int], nrb: int, z: int, n_embed: int, resolution: int,
                         attn_res: list[int], gumbel: bool) -> dict[str, tuple]:
    """Key -> shape of a taming VQModel / GumbelVQ state dict (Encoder / Decoder of
    diffusionmodules/model.py, quantizer, quant convs, VQLPIPSWithDiscriminator), written from
    the published architecture, independently of our Paddle model."""
    t: dict[str, tuple] = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    in_mult, res = (1,) + tuple(ch_mult), resolution
    for i in range(len(ch_mult)):
        cin, cout = ch * in_mult[i], ch * ch_mult[i]
        for j in range(nrb):
            t.update(_resblock(f"encoder.down.{i}.block.{j}", cin, cout))
            if res in attn_res:
                t.update(_attn(f"encoder.down.{i}.attn.{j}", cout))
            cin = cout
        if i != len(ch_mult) - 1:
            t.update({f"encoder.down.{i}.downsample.conv.weight": (cout, cout, 3, 3),
                      f"encoder.down.{i}.downsample.conv.bias": (cout,)})
            res //= 2
    c = ch * ch_mult[-1]
    for side in ("encoder", "decoder"):
        t.update(_resblock(f"{side}.mid.block_1", c, c))
        t.update(_attn(f"{side}.mid.attn_1", c))
        t.update(_resblock(f"{side}.mid.block_2", c, c))
    t.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,),
              "encoder.conv_out.weight": (z, c, 3, 3), "encoder.conv_out.bias": (z,),
              "decoder.conv_in.weight": (c, z, 3, 3), "decoder.conv_in.bias": (c,)})
    cin = c
    for i in reversed(range(len(ch_mult))):
        cout = ch * ch_mult[i]
        for j in range(nrb + 1):
            t.update(_resblock(f"decoder.up.{i}.block.{j}", cin, cout))
            if res in attn_res:
                t.update(_attn(f"decoder.up.{i}.attn.{j}", cout))
            cin = cout
        if i != 0:
            t.update({f"decoder.up.{i}.upsample.conv.weight": (cout, cout, 3, 3),
                      f"decoder.up.{i}.upsample.conv.bias": (cout,)})
            res *= 2
    t.update({"decoder.norm_out.weight": (cin,), "decoder.norm_out.bias": (cin,),
              "decoder.conv_out.weight": (3, cin, 3, 3), "decoder.conv_out.bias": (3,),
              "quant_conv.weight": (z, z, 1, 1), "quant_conv.bias": (z,),
              "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,)})
    if gumbel:
        t.update({"quantize.proj.weight": (n_embed, z, 1, 1), "quantize.proj.bias": (n_embed,),
                  "quantize.embed.weight": (n_embed, z)})
    else:
        t["quantize.embedding.weight"] = (n_embed, z)
    # LPIPS inside the loss: torchvision vgg16.features conv indices, lin heads, scaling buffers
    lp = "loss.perceptual_loss"
    t.update({f"{lp}.scaling_layer.shift": (1, 3, 1, 1), f"{lp}.scaling_layer.scale": (1, 3, 1, 1)})
    convs = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
             (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
    for idx, cin_, cout_ in convs:
        s = 1 + sum(idx >= b for b in (4, 9, 16, 23))
        t.update({f"{lp}.net.slice{s}.{idx}.weight": (cout_, cin_, 3, 3), f"{lp}.net.slice{s}.{idx}.bias": (cout_,)})
    for i, cc in enumerate([64, 128, 256, 512, 512]):
        t[f"{lp}.lin{i}.model.1.weight"] = (1, cc, 1, 1)
    # NLayerDiscriminator (3 layers, BatchNorm)
    d = "loss.discriminator.main"
    t.update({f"{d}.0.weight": (64, 3, 4, 4), f"{d}.0.bias": (64,), f"{d}.11.weight": (1, 512, 4, 4), f"{d}.11.bias": (1,)})
    for conv_i, (cin_, cout_) in zip((2, 5, 8), ((64, 128), (128, 256), (256, 512))):
        t[f"{d}.{conv_i}.weight"] = (cout_, cin_, 4, 4)
        bn = f"{d}.{conv_i + 1}"
        t.update({f"{bn}.weight": (cout_,), f"{bn}.bias": (cout_,), f"{bn}.running_mean": (cout_,),
                  f"{bn}.running_var": (cout_,), f"{bn}.num_batches_tracked": ()})
    return t


SMALL = dict(ch=128, ch_mult=[1, 1, 2], nrb=1, z=16, n_embed=32, resolution=16, attn_res=[4])


def _write_source(path, shapes: dict[str, tuple], seed: int = 0):
    rng = np.random.default_rng(seed)
    sd = collections.OrderedDict((k, np.asarray(rng.standard_normal(s) * 0.05, dtype=np.float32)) for k, s in shapes.items())
    write_torch_zip(path, {"epoch": 3, "global_step": 1000, "state_dict": sd})
    return sd


@pytest.mark.parametrize("gumbel", [False, True])
def test_every_source_key_is_used_or_dropped_and_shapes_match(tmp_path, gumbel):
    shapes = taming_source_shapes(**SMALL, gumbel=gumbel)
    sd = _write_source(tmp_path / "model.ckpt", shapes)
    out = convert_taming(tmp_path / "model.ckpt", tmp_path / "vqgan", lpips_out=tmp_path / "lpips.pdparams",
                         image_size=16)
    ckpt, cfg = load_checkpoint_config(out)
    assert cfg.VQ.kind == ("vqgan_gumbel" if gumbel else "vqgan")
    assert (cfg.VQ.hidden_channels, cfg.VQ.channel_mult, cfg.VQ.downsample_factor) == (128, [1, 1, 2], 4)
    model = VQGAN(cfg.VQ)
    set_model_state(model, load_model_state(ckpt), ckpt)  # strict: names and shapes
    state = model.state_dict()
    src_model_keys = [k for k in sd if not k.startswith("loss.")]
    assert len(src_model_keys) == len(state) - (0 if gumbel else len(KEEP_INIT))
    np.testing.assert_array_equal(state["encoder.down.2.attn.0.q.weight"].numpy(), sd["encoder.down.2.attn.0.q.weight"])
    key = "quantizer.embed.weight" if gumbel else "quantizer.codebook"
    src = "quantize.embed.weight" if gumbel else "quantize.embedding.weight"
    np.testing.assert_array_equal(state[key].numpy(), sd[src])
    lpips = LPIPS.from_file(tmp_path / "lpips.pdparams")  # strict load of every LPIPS key
    np.testing.assert_array_equal(lpips.state_dict()["lin2.model.1.weight"].numpy(),
                                  sd["loss.perceptual_loss.lin2.model.1.weight"])


def test_unknown_key_and_wrong_shape_are_refused(tmp_path):
    shapes = taming_source_shapes(**SMALL, gumbel=False)
    bad = dict(shapes, **{"mystery.weight": (3,)})
    _write_source(tmp_path / "a.ckpt", bad)
    with pytest.raises(ConversionError, match="mystery.weight"):
        convert_taming(tmp_path / "a.ckpt", tmp_path / "a", image_size=16)
    bad = dict(shapes, **{"decoder.conv_out.bias": (4,)})
    _write_source(tmp_path / "b.ckpt", bad)
    with pytest.raises(ConversionError, match="decoder.conv_out.bias"):
        convert_taming(tmp_path / "b.ckpt", tmp_path / "b", image_size=16)


def test_forward_matches_a_pytorch_implementation_of_taming(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as TF

    shapes = taming_source_shapes(**SMALL, gumbel=False)
    sd = _write_source(tmp_path / "model.ckpt", shapes, seed=1)
    ckpt = convert_taming(tmp_path / "model.ckpt", tmp_path / "vqgan", image_size=16)
    _, cfg = load_checkpoint_config(ckpt)
    model = VQGAN(cfg.VQ)
    set_model_state(model, load_model_state(ckpt), ckpt)
    model.eval()
    w = {k: torch.from_numpy(v) for k, v in read_taming_state(tmp_path / "model.ckpt").items()}

    # taming's forward, written functionally over the state dict
    def gn(x, p):
        return TF.group_norm(x, 32, w[f"{p}.weight"], w[f"{p}.bias"], eps=1e-6)

    def conv(x, p, pad=1, stride=1):
        return TF.conv2d(x, w[f"{p}.weight"], w[f"{p}.bias"], stride=stride, padding=pad)

    def res(x, p):
        h = conv(TF.silu(gn(x, f"{p}.norm1")), f"{p}.conv1")
        h = conv(TF.silu(gn(h, f"{p}.norm2")), f"{p}.conv2")
        return (conv(x, f"{p}.nin_shortcut", 0) if f"{p}.nin_shortcut.weight" in w else x) + h

    def attn(x, p):
        h = gn(x, f"{p}.norm")
        b, c, hh, ww = x.shape
        q = conv(h, f"{p}.q", 0).reshape(b, c, -1).permute(0, 2, 1)
        k = conv(h, f"{p}.k", 0).reshape(b, c, -1)
        v = conv(h, f"{p}.v", 0).reshape(b, c, -1)
        a = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        return x + conv(torch.bmm(v, a.permute(0, 2, 1)).reshape(b, c, hh, ww), f"{p}.proj_out", 0)

    def mid(h, s):
        return res(attn(res(h, f"{s}.mid.block_1"), f"{s}.mid.attn_1"), f"{s}.mid.block_2")

    x = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32))
    h = conv(x, "encoder.conv_in")
    for i in range(3):
        h = res(h, f"encoder.down.{i}.block.0")
        if i == 2:
            h = attn(h, f"encoder.down.{i}.attn.0")
        else:
            h = conv(TF.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", 0, 2)
    h = conv(TF.silu(gn(mid(h, "encoder"), "encoder.norm_out")), "encoder.conv_out")
    z = conv(h, "quant_conv", 0)
    emb = w["quantize.embedding.weight"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, 16)
    ids = torch.cdist(flat, emb).argmin(1)
    zq = emb[ids].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)
    h = mid(conv(conv(zq, "post_quant_conv", 0), "decoder.conv_in"), "decoder")
    for i in reversed(range(3)):
        for j in range(2):
            h = res(h, f"decoder.up.{i}.block.{j}")
            if i == 2:
                h = attn(h, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = conv(TF.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv")
    ref = conv(TF.silu(gn(h, "decoder.norm_out")), "decoder.conv_out")

    px = paddle.to_tensor(x.numpy())
    np.testing.assert_array_equal(model.encode_to_ids(px).numpy().reshape(-1), ids.numpy())
    ours = model._decode_ids(paddle.to_tensor(ids.numpy().reshape(2, 4, 4))).numpy()
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-4)
