"""taming-transformers VQGAN `model.ckpt` -> a VQGAN tokenizer checkpoint folder (no torch import).

    python tools/convert_checkpoint.py taming --in model.ckpt --out weights/vqgan_f16_16384 \
        [--lpips-out weights/lpips_vgg.pdparams] [--image-size 256]

The Lightning checkpoint is read with the restricted unpickler (`torch_pickle`); its
`state_dict` holds the whole `VQModel`: encoder / decoder / quant_conv / post_quant_conv (same
names here, `vq/vqgan.py` mirrors taming's layout), the quantizer, and the training loss
(`loss.perceptual_loss.*` = LPIPS over VGG16, `loss.discriminator.*` = the patch discriminator).
Quantizers: `quantize.embedding.weight` (VectorQuantizer2: f16-1024 / f16-16384 ->
VQ.kind vqgan) or `quantize.proj.*` + `quantize.embed.weight` (GumbelQuantize: the f8-8192
release -> VQ.kind vqgan_gumbel). Loss keys are dropped from the tokenizer; the LPIPS ones can be
written to a separate file for VQGAN.lpips_weights (`--lpips-out`). The network size (ch,
ch_mult, num_res_blocks, z / embed dims, codebook) is read from the tensor shapes.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from ernie_vilg.convert.name_table import (
    ConversionError, Rule, apply_table, tokenizer_target, write_tokenizer_checkpoint,
)

# One table for taming's VQModel / GumbelVQ state dicts (first match wins).
TAMING_TABLE: list[Rule] = [
    Rule(r"(encoder|decoder)\.(.+)", r"\1.\2"),
    Rule(r"(quant_conv|post_quant_conv)\.(weight|bias)", r"\1.\2"),
    Rule(r"quantize\.embedding\.weight", "quantizer.codebook"),  # VectorQuantizer2
    Rule(r"quantize\.proj\.(weight|bias)", r"quantizer.proj.\1"),  # GumbelQuantize logits
    Rule(r"quantize\.embed\.weight", "quantizer.embed.weight"),  # GumbelQuantize codes
    Rule(r"loss\.perceptual_loss\.(.+)", r"\1", "extra"),  # LPIPS (VGG16 + lin heads)
    Rule(r"loss\..+", None, "drop"),  # discriminator (+ BatchNorm statistics) and the rest
]
# usage statistics of our nearest-code quantizer: taming has none, they start at zero
KEEP_INIT = ("quantizer.steps_since_used", "quantizer.usage_avg")


def _count(state: dict[str, np.ndarray], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_vq_config(state: dict[str, np.ndarray], image_size: int = 256):
    """The VQConfig of the network in a taming state dict (sizes read from the tensor shapes)."""
    from ernie_vilg.config import VQConfig

    try:
        ch = int(state["encoder.conv_in.weight"].shape[0])
        levels = _count(state, r"encoder\.down\.(\d+)\.")
        mult = [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(levels)]
        num_res_blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
        z_channels = int(state["encoder.conv_out.weight"].shape[0])
        embed_dim = int(state["quant_conv.weight"].shape[0])
    except KeyError as exc:
        raise ConversionError(f"not a taming VQGAN state dict: no {exc}") from None
    if "quantize.embedding.weight" in state:
        kind, codebook = "vqgan", int(state["quantize.embedding.weight"].shape[0])
    elif "quantize.proj.weight" in state:
        kind, codebook = "vqgan_gumbel", int(state["quantize.proj.weight"].shape[0])
    else:
        raise ConversionError("taming state dict has no quantizer (quantize.embedding / quantize.proj)")
    if z_channels != embed_dim:
        raise ConversionError(f"z_channels {z_channels} != embed_dim {embed_dim}: only the released layout "
                              "(z_channels == embed_dim) is supported")
    attn_levels = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", k))}
    if attn_levels - {levels - 1}:
        raise ConversionError(f"attention at levels {sorted(attn_levels)}: only the coarsest level is supported")
    if state.get("encoder.conv_out.weight") is not None and int(state["encoder.conv_in.weight"].shape[1]) != 3:
        raise ConversionError("only RGB taming models are supported")
    return VQConfig(kind=kind, in_channels=3, hidden_channels=ch, channel_mult=mult, num_res_blocks=num_res_blocks,
                    downsample_factor=2 ** (levels - 1), patch_size=1, codebook_size=codebook, embed_dim=embed_dim,
                    beta=0.25, use_ema=False, dead_code_steps=0, l2_normalize=False)


def read_taming_state(path: str | Path) -> dict[str, np.ndarray]:
    """The model state dict of a taming checkpoint (Lightning `state_dict`, or a bare one)."""
    from ernie_vilg.convert.torch_pickle import load_torch_zip, flatten_state

    obj = load_torch_zip(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    state = flatten_state(obj)
    if not state:
        raise ConversionError(f"{path}: no tensors found")
    return state


def convert_taming(src: str | Path, out: str | Path, lpips_out: Optional[str | Path] = None,
                   image_size: int = 256) -> Path:
    """Convert `src` (model.ckpt) into the checkpoint folder `out`; optionally write LPIPS weights."""

    state = read_taming_state(src)
    cfg, model = tokenizer_target("vqgan", infer_vq_config(state, image_size), image_size)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    conv = apply_table(state, TAMING_TABLE, shapes, KEEP_INIT, where=str(src))
    if lpips_out is not None:
        write_lpips(conv.extras, lpips_out, where=str(src))
    meta = {"produced_by": "tools/convert_checkpoint.py taming", "converted_from": str(src),
            "dropped_source_keys": len(conv.dropped)}
    return write_tokenizer_checkpoint(out, cfg, model, conv.state, meta)


def write_lpips(weights: dict[str, np.ndarray], out: str | Path, where: str = "source") -> Path:
    """Check LPIPS weights against `gan_losses.LPIPS` (names and shapes) and save them."""
    import paddle

    from ernie_vilg.vq.gan_losses import LPIPS

    own = {k: list(v.shape) for k, v in LPIPS().state_dict().items()}
    rules = [Rule(r"(.+)", r"\1")]
    conv = apply_table(weights, rules, own, where=f"{where} (LPIPS)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paddle.save({k: paddle.to_tensor(v.astype("float32")) for k, v in conv.state.items()}, str(out))
    return out
