"""Inference export: static `paddle.jit` graphs of a checkpoint, loadable by Paddle Inference.

Each stage says what it exports (its `StageSpec.export` hook in `ernie_vilg.stages`); a documented
subset, the sampling loop, KV cache and reranking stay in Python:

    vq_decoder        ids [B, h, w] int64 -> images [B, 3, H, W] float32 in [-1, 1]   (any B)
                      (vq, vqgan, dvae; and a vilg-family checkpoint's `image_tokenizer/`)
    txt2img_logits    text_ids [B, L] int64, image_ids [B, n] int64 -> [B, n, V_img]
    img2txt_logits    text_ids [B, L] int64, image_ids [B, n] int64 -> [B, L - 1, V_txt]
                      (vilg, caption_finetune, vilg_e2e)
    e2e_reconstruct   text_ids, image_ids -> the end-to-end reconstructor's image (vilg_e2e)
    reranker_images / reranker_texts   images / text ids -> unit embeddings (reranker)

VQA has no graph (its question prefix changes the mask per sample; the registry says so). The
transformer graphs are teacher-forced full streams: because the target segment is causal, row k
of `txt2img_logits` depends only on the text and image_ids[:, :k], so one call with the tokens
generated so far (the rest padded with any id) is one uncached decoding step. Their B and L are
fixed at export time (`batch_size`, Model.max_text_len: pad texts with [PAD]) because the model
reshapes by the batch size.

Each graph is `out/<name>.json` (PIR program) + `out/<name>.pdiparams`; `out/export.json` lists
inputs, outputs and shapes. Load with `paddle.jit.load(out/<name>)` or with Paddle Inference
(`load_predictor`); the CPU predictor runs with oneDNN off, because Paddle 3.3's oneDNN passes
reject these programs (unsupported attribute / fused-shape errors).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paddle

from ernie_vilg.config import Config, ConfigError

EXPORT_INFO = "export.json"


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message names it."""


def _save(graph: Any, prefix: Path) -> dict[str, Any]:
    graph.layer.eval()
    static = paddle.jit.to_static(graph.layer, input_spec=graph.specs, full_graph=True)
    paddle.jit.save(static, str(prefix))
    return {"name": graph.name, "inputs": graph.inputs, "outputs": graph.outputs, "description": graph.description}


def _load_weights(ckpt: Path, cfg: Config) -> paddle.nn.Layer:
    from ernie_vilg.checkpoint_io import load_weights_into
    from ernie_vilg.stages import build_bare_model

    model = build_bare_model(cfg, ckpt)
    load_weights_into(model, ckpt)
    model.eval()
    return model


def _tokenizer_folder(ckpt: Path) -> Optional[Path]:
    extras = ckpt / "vilg.json"
    name = "image_tokenizer"
    if extras.is_file():
        name = json.loads(extras.read_text(encoding="utf-8")).get("image_tokenizer") or name
    folder = ckpt / name
    from ernie_vilg.checkpoint_io import has_weights

    return folder if has_weights(folder) else None


def _export_graphs(ckpt: Path, cfg: Config, out: Path, batch_size: int) -> list[dict[str, Any]]:
    from ernie_vilg.stages import export_graphs

    try:
        graphs = export_graphs(_load_weights(ckpt, cfg), cfg, batch_size)
    except ConfigError as exc:
        raise ExportError(f"{ckpt}: {exc}") from None
    return [_save(graph, out / graph.name) for graph in graphs]


def export_checkpoint(ckpt: str | Path, out: str | Path, batch_size: int = 1) -> dict[str, Any]:
    """Write the static graphs of a checkpoint into `out` (what its stage exports, plus the
    decoder of a carried image tokenizer); returns export.json's content."""
    from ernie_vilg.checkpoint_io import load_checkpoint_config

    if batch_size < 1:
        raise ExportError(f"batch size {batch_size}: must be >= 1")
    ckpt_dir, cfg = load_checkpoint_config(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    graphs = _export_graphs(ckpt_dir, cfg, out, batch_size)
    tokenizer = _tokenizer_folder(ckpt_dir)
    if tokenizer is not None:
        _, tok_cfg = load_checkpoint_config(tokenizer)
        graphs += _export_graphs(tokenizer, tok_cfg, out, batch_size)
    info = {"checkpoint": str(ckpt_dir), "stage": cfg.Global.stage, "paddle": paddle.__version__, "graphs": graphs}
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
