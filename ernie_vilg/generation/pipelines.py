"""End-to-end pipelines behind the tools: load a checkpoint folder, text -> image, image -> text.

A vilg checkpoint folder (written by the Trainer + `VilgTrainModule.save_extras`) holds
`model.pdparams`, `config.yaml`, `meta.json`, `vocab.txt`, `vilg.json` and `image_tokenizer/` (a copy
of the image tokenizer checkpoint), so `--ckpt DIR` alone is enough.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import paddle

from ernie_vilg.checkpoint_io import has_weights
from ernie_vilg.config import Config, GenerationConfig
from ernie_vilg.generation.decoding import (
    SamplingParams,
    TextSpecials,
    generate_image_tokens,
)
from ernie_vilg.models.transformer import ErnieViLG

# stages whose checkpoints hold another model: --ckpt pointed at one says what it is
NOT_VILG_STAGES = {"vq": "an image tokenizer", "vqgan": "an image tokenizer", "dvae": "an image tokenizer",
                   "reranker": "a reranker"}


# (resolved config, checkpoint folder) -> the stage's bare model (`ernie_vilg.stages.build_bare_model`)
ModelBuilder = Callable[[Config, Path], paddle.nn.Layer]


@dataclass
class VilgBundle:
    cfg: Config
    model: ErnieViLG  # eval mode (ErnieViLG or a subclass: the end-to-end model)
    text_tokenizer: Any  # ernie_vilg.text.TextTokenizer
    image_tokenizer: Optional[Any]  # ernie_vilg.vq.base.ImageTokenizer (frozen), None if absent
    ckpt_dir: Path
    tokenizer_dir: Optional[Path] = None  # where image_tokenizer was loaded from
    # which network turns generated ids into pixels: "tokenizer" (the two-stage decoder) or "e2e"
    # (an end-to-end checkpoint's own reconstructor, paper sec. 3.1.3); the default is the model's
    decoder: str = "tokenizer"

    @property
    def image_size(self) -> int:
        """Pixels per side of the images the model's token grid stands for (Data.image_size,
        made consistent with the grid when the checkpoint was loaded: `_match_image_size`)."""
        return self.cfg.Data.image_size

    @property
    def specials(self) -> TextSpecials:
        tok = self.text_tokenizer
        return TextSpecials(tok.cls_id, tok.sep_id, tok.pad_id)


def _tokenizer_dir(ckpt: Path, cfg: Config) -> Optional[Path]:
    """The copy inside the checkpoint, else the original path recorded at training time."""
    extras_file = ckpt / "vilg.json"
    extras = json.loads(extras_file.read_text(encoding="utf-8")) if extras_file.is_file() else {}
    candidates = []
    if extras.get("image_tokenizer"):
        candidates.append(ckpt / extras["image_tokenizer"])
    for src in (extras.get("tokenizer_source"), cfg.Data.tokenizer_ckpt):
        if src:
            candidates.append(Path(src))
    return next((c for c in candidates if has_weights(c)), None)


def bundle_from_checkpoint(ckpt: str | Path, build_model: ModelBuilder, need_image_tokenizer: bool = False
                           ) -> VilgBundle:
    """Model, text tokenizer and image tokenizer from a checkpoint folder (or its parent run), or
    from a pretrained folder (generation/pretrained.py); `build_model` makes the stage's bare model
    (`ernie_vilg.pipeline.load_bundle` passes the stage registry's). Weights saved in float16 /
    bfloat16 are cast to the model's dtype."""
    from ernie_vilg.generation.pretrained import (
        IMAGE_TOKENIZER_DIR, is_pretrained_dir, load_pretrained_config, load_pretrained_weights,
    )
    from ernie_vilg.text.tokenizer import TextTokenizer
    from ernie_vilg.checkpoint_io import CheckpointError, load_checkpoint_config, load_weights_into, set_model_state

    if is_pretrained_dir(ckpt):
        ckpt_dir, cfg = Path(ckpt), load_pretrained_config(ckpt)
        tok_dir: Optional[Path] = ckpt_dir / IMAGE_TOKENIZER_DIR
        tok_dir = tok_dir if has_weights(tok_dir) else None

        def load_weights(model: Any, folder: Path) -> None:
            set_model_state(model, load_pretrained_weights(folder), folder)
    else:
        ckpt_dir, cfg = load_checkpoint_config(ckpt)
        if cfg.Global.stage in NOT_VILG_STAGES:
            raise CheckpointError(f"{ckpt_dir}: {NOT_VILG_STAGES[cfg.Global.stage]} checkpoint (Global.stage "
                                  f"{cfg.Global.stage}), not an ERNIE-ViLG one: pass the vilg run folder "
                                  "(e.g. runs/quickstart/vilg)")
        tok_dir = _tokenizer_dir(ckpt_dir, cfg)
        load_weights = load_weights_into  # one tensor at a time (sharded layout)
    vocab = ckpt_dir / "vocab.txt"
    text_tokenizer = TextTokenizer(vocab if vocab.is_file() else cfg.Data.vocab_file)
    image_tokenizer = None
    if tok_dir is not None:
        from ernie_vilg.vq.registry import load_tokenizer

        image_tokenizer = load_tokenizer(tok_dir)
    elif need_image_tokenizer:
        raise FileNotFoundError(f"{ckpt_dir}: no image tokenizer (neither image_tokenizer/ nor "
                                f"Data.tokenizer_ckpt={cfg.Data.tokenizer_ckpt!r} has weights)")
    # the saved config is the resolved one: sizes are never derived again here
    for key in ("text_vocab_size", "image_vocab_size", "image_grid"):
        if getattr(cfg.Model, key) <= 0:
            raise CheckpointError(f"{ckpt_dir}: config.yaml has Model.{key}={getattr(cfg.Model, key)}: not the "
                                  "resolved config of a trained checkpoint")
    if image_tokenizer is not None:
        _match_image_size(cfg, image_tokenizer)
    model = build_model(cfg, ckpt_dir)
    load_weights(model, ckpt_dir)
    model.eval()
    decoder = "e2e" if hasattr(model, "reconstruct_from_ids") else "tokenizer"
    return VilgBundle(cfg, model, text_tokenizer, image_tokenizer, ckpt_dir, tok_dir, decoder)


def _match_image_size(cfg: Config, image_tokenizer: Any) -> None:
    """Images given to the tools are resized to Data.image_size before the VQ encoder; that size
    must give the model's token grid. Checkpoints resolved before the stage registry carry their
    base config's image size while their token shards were made at the tokenizer's (the
    quickstart: 64 px in the config, 48 px shards); for those Data.image_size becomes the size the
    grid stands for (image_grid x the tokenizer's downsample factor). The vilg resolver now saves
    the shards' size."""
    grid = cfg.Model.image_grid
    if image_tokenizer.grid_size(cfg.Data.image_size) != grid:
        cfg.Data.image_size = grid * int(image_tokenizer.downsample_factor)


def image_sampling_params(gen: GenerationConfig) -> SamplingParams:
    return SamplingParams(greedy=False, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)


def text_to_image_ids(bundle: VilgBundle, texts: Sequence[str], num_candidates: int = 1,
                      seed: int | Sequence[int] = 0, params: Optional[SamplingParams] = None,
                      cfg_scale: Optional[float] = None, text_width: int = 0,
                      prefix_ids: Optional[np.ndarray] = None) -> np.ndarray:
    """Image token grids [len(texts) * num_candidates, h, w] (candidates of a text are adjacent).
    `seed`: one for the batch, or one per text (decoding.row_rngs). `cfg_scale`: classifier-free
    guidance scale (default Generation.cfg_scale). `text_width` > 0 pads every text to that many
    ids (default: to the longest of the batch; a fixed width makes a text's image independent of
    its batch-mates). `prefix_ids`: image completion (decoding.generate_image_tokens)."""
    cfg = bundle.cfg
    text_ids = encode_texts(bundle, texts, text_width)
    scale = cfg.Generation.cfg_scale if cfg_scale is None else cfg_scale
    return generate_image_tokens(bundle.model, text_ids, params or image_sampling_params(cfg.Generation),
                                 num_candidates=num_candidates, seed=seed, cfg_scale=scale,
                                 specials=bundle.specials, prefix_ids=prefix_ids)


def encode_texts(bundle: VilgBundle, texts: Sequence[str], text_width: int = 0) -> np.ndarray:
    """Text ids as generation feeds them: padded to `text_width`, or to the batch's longest."""
    if text_width:
        return bundle.text_tokenizer.encode_batch(list(texts), text_width)
    return bundle.text_tokenizer.encode_batch(list(texts), bundle.cfg.Data.max_text_len, pad_to_longest=True)


def decode_generated(bundle: VilgBundle, texts: Sequence[str], ids: np.ndarray, num_candidates: int = 1,
                     text_width: int = 0) -> np.ndarray:
    """uint8 images [N, H, W, 3] of generated token grids [len(texts) * num_candidates, h, w]
    through the bundle's decoder: the image tokenizer (two-stage), or the end-to-end model's
    reconstructor reading its own hidden states of (text, ids) (`text_width` as generated)."""
    if bundle.decoder == "tokenizer":
        if bundle.image_tokenizer is None:
            raise FileNotFoundError(f"{bundle.ckpt_dir}: no image tokenizer to decode image tokens")
        return decode_image_ids(bundle.image_tokenizer, ids)
    if bundle.decoder != "e2e" or not hasattr(bundle.model, "reconstruct_from_ids"):
        raise ValueError(f"decoder {bundle.decoder!r}: the model has no end-to-end reconstructor "
                         "(use 'tokenizer')")
    from ernie_vilg.data.images import denormalize

    text = np.repeat(encode_texts(bundle, texts, text_width), num_candidates, axis=0)
    flat = np.asarray(ids, dtype=np.int64).reshape([len(text), -1])
    with paddle.no_grad():
        images = bundle.model.reconstruct_from_ids(paddle.to_tensor(text), paddle.to_tensor(flat))
    return denormalize(images.numpy())


def decode_image_ids(image_tokenizer: Any, ids: np.ndarray) -> np.ndarray:
    """Token grids [N, h, w] -> uint8 RGB images [N, H, W, 3] with the VQ decoder (two-stage path)."""
    from ernie_vilg.data.images import denormalize

    images = image_tokenizer.decode_ids(paddle.to_tensor(np.asarray(ids, dtype=np.int64)))
    return denormalize(images.numpy())


def text_to_image(bundle: VilgBundle, texts: Sequence[str], num_candidates: int = 1, seed: int = 0,
                  params: Optional[SamplingParams] = None, cfg_scale: Optional[float] = None) -> np.ndarray:
    """uint8 images [len(texts) * num_candidates, H, W, 3] (through `bundle.decoder`)."""
    if bundle.decoder == "tokenizer" and bundle.image_tokenizer is None:
        raise FileNotFoundError(f"{bundle.ckpt_dir}: no image tokenizer to decode image tokens")
    ids = text_to_image_ids(bundle, texts, num_candidates, seed, params, cfg_scale)
    return decode_generated(bundle, texts, ids, num_candidates)


def captions_from_ids(bundle: VilgBundle, image_ids: np.ndarray, strategy: Optional[str] = None,
                      seed: int = 0, cfg_scale: Optional[float] = None) -> list[str]:
    """Captions for image token grids [B, h, w] with Generation.decode_strategy (or `strategy`),
    guided with `cfg_scale` (default Generation.caption_cfg_scale; 1 = no guidance)."""
    from ernie_vilg.generation.captions import decode_captions

    return decode_captions(bundle.model, bundle.text_tokenizer, image_ids, bundle.cfg.Generation, strategy,
                           batch_size=len(image_ids) or 1, seed=seed, cfg_scale=cfg_scale)


def caption_images(bundle: VilgBundle, image_paths: Sequence[str | Path], strategy: Optional[str] = None,
                   batch_size: int = 16, progress: bool = False) -> list[str]:
    """One caption per image file (center crop + resize to `bundle.image_size`, then the VQ encoder).
    `progress`: a bar in images."""
    from ernie_vilg.data.images import load_image
    from ernie_vilg.runtime import progress_bar

    if bundle.image_tokenizer is None:
        raise FileNotFoundError(f"{bundle.ckpt_dir}: no image tokenizer to encode images")
    captions: list[str] = []
    bar = progress_bar(len(image_paths), "captions", "image", progress)
    for start in range(0, len(image_paths), batch_size):
        chunk = image_paths[start:start + batch_size]
        pixels = np.stack([load_image(p, bundle.image_size) for p in chunk])  # [b, 3, H, W]
        ids = bundle.image_tokenizer.encode_to_ids(paddle.to_tensor(pixels)).numpy()
        captions += captions_from_ids(bundle, ids, strategy)
        bar.update(len(chunk))
    bar.close()
    return captions


def save_grid(images: np.ndarray, path: str | Path, columns: int = 0, min_cell: int = 0) -> None:
    """uint8 images [N, H, W, 3] -> one PNG grid (columns default: ceil(sqrt(N))). With
    `min_cell` > 0 each image is first upscaled (nearest neighbour, integer factor) so that a
    cell is at least `min_cell` pixels; 0 keeps the images' own size."""
    from PIL import Image

    if min_cell > 0:
        from ernie_vilg.generation.sample_pages import upscale_nearest

        images = upscale_nearest(images, min_cell)
    n, h, w, _ = images.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    Image.fromarray(grid).save(path)


def apply_sampling_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """Replace Generation.temperature / top_k / top_p / cfg_scale where a value is given (not
    None), after checking it (ValueError naming the flag)."""
    checks = {"temperature": (lambda v: v > 0, "> 0"), "top_k": (lambda v: v >= 0, ">= 0"),
              "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "cfg_scale": (lambda v: v > 0, "> 0")}
    for key, value in overrides.items():
        if value is None:
            continue
        ok, rule = checks[key]
        if not ok(value):
            raise ValueError(f"--{key.replace('_', '-')} must be {rule}, got {value}")
        setattr(cfg.Generation, key, type(getattr(cfg.Generation, key))(value))


def image_prefix_ids(bundle: VilgBundle, image_path: str | Path, keep_rows: int) -> np.ndarray:
    """The first `keep_rows` token rows of an image file's tokens, in raster order: int64 [keep_rows * w]."""
    from ernie_vilg.data.images import load_image

    if bundle.image_tokenizer is None:
        raise FileNotFoundError(f"{bundle.ckpt_dir}: no image tokenizer to encode --init-image")
    grid = bundle.cfg.Model.image_grid
    if not 1 <= keep_rows <= grid:
        raise ValueError(f"--keep-rows must be in [1, {grid}] (the image has {grid} token rows), got {keep_rows}")
    pixels = load_image(image_path, bundle.cfg.Data.image_size)[None]  # [1, 3, H, W]
    ids = bundle.image_tokenizer.encode_to_ids(paddle.to_tensor(pixels)).numpy()[0]  # [h, w]
    return ids[:keep_rows].reshape(-1).astype(np.int64)


def save_pretrained(bundle: VilgBundle, out: str | Path, safetensors: bool = False, dtype: Optional[str] = None
                    ) -> Path:
    """tools/convert_checkpoint.py to-pretrained: the pretrained folder (generation/pretrained.py)
    of a loaded vilg checkpoint folder, run folder, or pretrained folder."""
    from ernie_vilg.generation.pretrained import write_pretrained

    return write_pretrained(bundle, bundle.tokenizer_dir, out, safetensors, dtype)
