"""Inference export: static `paddle.jit` graphs of a checkpoint, loadable by Paddle Inference.

What is exported (a documented subset; the sampling loop, KV cache and reranking stay in Python):

    vq_decoder       ids [B, h, w] int64 -> images [B, 3, H, W] float32 in [-1, 1]   (any B)
    txt2img_logits   text_ids [B, L] int64, image_ids [B, n] int64 -> [B, n, V_img]
    img2txt_logits   text_ids [B, L] int64, image_ids [B, n] int64 -> [B, L - 1, V_txt]

A vq checkpoint gives `vq_decoder`; a vilg checkpoint gives the two transformer graphs and, when
it carries its image tokenizer (`image_tokenizer/`), `vq_decoder` too. The transformer graphs are
teacher-forced full streams: because the target segment is causal, row k of `txt2img_logits`
depends only on the text and image_ids[:, :k], so one call with the tokens generated so far (the
rest padded with any id) is one uncached decoding step (row k = the next token's logits).
Their B and L are fixed at export time (`batch_size`, Model.max_text_len: pad texts with [PAD])
because the model reshapes by the batch size.

Each graph is `out/<name>.json` (PIR program) + `out/<name>.pdiparams`; `out/export.json` lists
inputs, outputs and shapes. Load with `paddle.jit.load(out/<name>)` or with Paddle Inference
(`load_predictor`); the CPU predictor runs with oneDNN off, because Paddle 3.3's oneDNN passes
reject these programs (unsupported attribute / fused-shape errors).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paddle

from ernie_vilg.config import Config

EXPORT_INFO = "export.json"


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message names it."""


@dataclass
class GraphInfo:
    name: str
    inputs: list[dict[str, Any]]  # {"name", "shape" (-1 = any), "dtype"}
    outputs: list[dict[str, Any]]
    description: str


class _VQDecoder(paddle.nn.Layer):
    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        # = ImageTokenizer.decode_ids without the eager-only shape checks and no_grad wrapper
        return paddle.clip(self.tokenizer._decode_ids(ids), -1.0, 1.0)


class _Logits(paddle.nn.Layer):
    def __init__(self, model: paddle.nn.Layer, direction: Any) -> None:
        super().__init__()
        self.model, self.direction = model, direction

    def forward(self, text_ids: paddle.Tensor, image_ids: paddle.Tensor) -> paddle.Tensor:
        return self.model(text_ids, image_ids, self.direction)


def _save(layer: paddle.nn.Layer, specs: list[paddle.static.InputSpec], prefix: Path) -> None:
    layer.eval()
    static = paddle.jit.to_static(layer, input_spec=specs, full_graph=True)
    paddle.jit.save(static, str(prefix))


def _load_weights(ckpt: Path, cfg: Config) -> paddle.nn.Layer:
    from ernie_vilg.convert.safetensors_io import build_model_for
    from ernie_vilg.checkpoint_io import load_model_state, set_model_state

    model = build_model_for(cfg)
    set_model_state(model, load_model_state(ckpt), ckpt)
    model.eval()
    return model


def _tokenizer_folder(ckpt: Path) -> Optional[Path]:
    extras = ckpt / "vilg.json"
    name = "image_tokenizer"
    if extras.is_file():
        name = json.loads(extras.read_text(encoding="utf-8")).get("image_tokenizer") or name
    folder = ckpt / name
    return folder if (folder / "model.pdparams").is_file() else None


def export_vq_decoder(tokenizer_ckpt: Path, out: Path) -> GraphInfo:
    from ernie_vilg.vq.registry import load_tokenizer
    from ernie_vilg.checkpoint_io import load_checkpoint_config

    _, cfg = load_checkpoint_config(tokenizer_ckpt)
    tokenizer = load_tokenizer(tokenizer_ckpt)
    g = tokenizer.grid_size(cfg.Data.image_size)
    _save(_VQDecoder(tokenizer), [paddle.static.InputSpec([None, g, g], "int64", "ids")], out / "vq_decoder")
    size = cfg.Data.image_size
    return GraphInfo("vq_decoder", [{"name": "ids", "shape": [-1, g, g], "dtype": "int64"}],
                     [{"name": "images", "shape": [-1, 3, size, size], "dtype": "float32"}],
                     "image token ids -> images in [-1, 1] (the VQ decoder)")


def export_vilg(ckpt: Path, cfg: Config, out: Path, batch_size: int) -> list[GraphInfo]:
    from ernie_vilg.models.sparse_masks import Direction

    model = _load_weights(ckpt, cfg)
    m = cfg.Model
    L, n = m.max_text_len, m.image_grid ** 2
    specs = [paddle.static.InputSpec([batch_size, L], "int64", "text_ids"),
             paddle.static.InputSpec([batch_size, n], "int64", "image_ids")]
    ins = [{"name": "text_ids", "shape": [batch_size, L], "dtype": "int64"},
           {"name": "image_ids", "shape": [batch_size, n], "dtype": "int64"}]
    _save(_Logits(model, Direction.TXT2IMG), specs, out / "txt2img_logits")
    _save(_Logits(model, Direction.IMG2TXT), specs, out / "img2txt_logits")
    return [
        GraphInfo("txt2img_logits", ins, [{"name": "logits", "shape": [batch_size, n, m.image_vocab_size],
                                           "dtype": "float32"}],
                  "row k: logits of image token k given the text and image_ids[:, :k] (one uncached step)"),
        GraphInfo("img2txt_logits", ins, [{"name": "logits", "shape": [batch_size, L - 1, m.text_vocab_size],
                                           "dtype": "float32"}],
                  "row j: logits of text token j + 1 given the image and text_ids[:, :j + 1]"),
    ]


def export_checkpoint(ckpt: str | Path, out: str | Path, batch_size: int = 1) -> dict[str, Any]:
    """Write the static graphs of a vq or vilg checkpoint into `out`; returns export.json's content."""
    from ernie_vilg.checkpoint_io import load_checkpoint_config

    if batch_size < 1:
        raise ExportError(f"batch size {batch_size}: must be >= 1")
    ckpt_dir, cfg = load_checkpoint_config(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = cfg.Global.stage
    if stage == "vq":
        graphs = [export_vq_decoder(ckpt_dir, out)]
    elif stage == "vilg":
        graphs = export_vilg(ckpt_dir, cfg, out, batch_size)
        tokenizer = _tokenizer_folder(ckpt_dir)
        if tokenizer is not None:
            graphs.append(export_vq_decoder(tokenizer, out))
    else:
        raise ExportError(f"{ckpt_dir}: stage {stage!r} has no export (known: vq, vilg)")
    info = {"checkpoint": str(ckpt_dir), "stage": stage, "paddle": paddle.__version__,
            "graphs": [asdict(g) for g in graphs]}
    (out / EXPORT_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8")
    return info


# --------------------------------------------------------------------------------------------
# loading with Paddle Inference
# --------------------------------------------------------------------------------------------
def load_predictor(prefix: str | Path, threads: int = 1) -> Any:
    """A Paddle Inference CPU predictor of an exported graph (`out/<name>`)."""
    from paddle import inference

    prefix = Path(prefix)
    program = prefix.with_suffix(".json")
    if not program.is_file():
        program = prefix.with_suffix(".pdmodel")
    params = prefix.with_suffix(".pdiparams")
    if not program.is_file() or not params.is_file():
        raise ExportError(f"{prefix}: no exported graph ({prefix.name}.json / .pdmodel + .pdiparams)")
    config = inference.Config(str(program), str(params))
    config.disable_gpu()
    config.disable_mkldnn()  # see the module docstring
    config.set_cpu_math_library_num_threads(threads)
    config.disable_glog_info()
    return inference.create_predictor(config)


def run_predictor(predictor: Any, *inputs: np.ndarray) -> np.ndarray:
    """Feed inputs in the graph's order; return the first output."""
    for name, array in zip(predictor.get_input_names(), inputs):
        handle = predictor.get_input_handle(name)
        handle.reshape(list(array.shape))
        handle.copy_from_cpu(np.ascontiguousarray(array))
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
