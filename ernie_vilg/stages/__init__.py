"""Every training stage, in one registry (`STAGES`) that every tool reads.

`tools/train.py` (via `prepare`), `convert_checkpoint.py` (to / from safetensors), `export.py`,
`pipeline.load_bundle` and the tests take a stage's TrainModule, resolver, bare model
builder and export hook from here, so a new stage is one file in this folder and one entry below.

The order of every entry point (`prepare`): validate the topology (no I/O), resolve the config
(derived sizes, references), build the stage. The Trainer saves the resolved config as is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import paddle

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.stages import caption_finetune, dvae, reranker, vilg, vilg_e2e, vq, vqa, vqgan
from ernie_vilg.stages.spec import ExportGraph, StageSpec
from ernie_vilg.training.module import TrainModule

_TOKENIZER_TOOLS = ("tokenize_images", "export", "convert_checkpoint", "vilg / vilg_e2e training (Data.tokenizer_ckpt)")
_VQA_NO_EXPORT = ("the question is a bidirectional source prefix whose length changes the attention mask per "
                  "sample; the fixed-shape logits graphs of the vilg stage would not apply it")

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("vq", "image tokenizer, VQVAE", vq.VQTrainModule, vq.resolve, vq.build_bare_tokenizer,
              vq.export_tokenizer, tools=_TOKENIZER_TOOLS),
    StageSpec("vqgan", "image tokenizer, VQGAN (+ its discriminator, an extra network)", vqgan.VQGANTrainModule,
              vqgan.resolve, vq.build_bare_tokenizer, vq.export_tokenizer, tools=_TOKENIZER_TOOLS),
    StageSpec("dvae", "image tokenizer, DALL-E dVAE", dvae.DVAETrainModule, dvae.resolve, vq.build_bare_tokenizer,
              vq.export_tokenizer, tools=_TOKENIZER_TOOLS),
    StageSpec("vilg", "the bidirectional text <-> image model", vilg.VilgTrainModule, vilg.resolve,
              vilg.build_bare_model, vilg.export_logits, tools=("generate", "caption", "demo", "export")),
    StageSpec("vilg_e2e", "generator + reconstructor trained end to end", vilg_e2e.E2ETrainModule,
              vilg_e2e.resolve, vilg_e2e.build_bare_model, vilg_e2e.export_e2e,
              tools=("generate", "caption", "export", "ablate_e2e")),
    StageSpec("caption_finetune", "caption fine-tuning from a vilg checkpoint", caption_finetune.CaptionFinetuneModule,
              caption_finetune.resolve, vilg.build_bare_model, vilg.export_logits,
              tools=("caption", "score_captions", "generate", "export")),
    StageSpec("vqa", "generative VQA fine-tuning", vqa.VqaTrainModule, vqa.resolve, vilg.build_bare_model,
              None, _VQA_NO_EXPORT, tools=("vqa",)),
    StageSpec("reranker", "contrastive image-text reranker for best-of-N", reranker.RerankerTrainModule,
              reranker.resolve, reranker.build_bare_model, reranker.export_reranker,
              tools=("generate --rerank", "filter_data", "export")),
)}


def stage_spec(name: str) -> StageSpec:
    """The registry entry of `name`, or ConfigError listing the known stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"Global.stage: unknown stage {name!r} (known: {', '.join(STAGES)})") from None


def prepare(cfg: Config, world_size: Optional[int] = None) -> TrainModule:
    """Validate the topology, resolve the config, build the stage; `module.cfg` is the resolved
    config (give it to the Trainer). `world_size` defaults to the launcher's."""
    from ernie_vilg.runtime import world_from_env
    from ernie_vilg.training.distributed import validate

    spec = stage_spec(cfg.Global.stage)
    validate(cfg, world_from_env()[1] if world_size is None else world_size)
    return spec.module(spec.resolve(cfg))


def build_bare_model(cfg: Config, ckpt_dir: Optional[Path] = None) -> paddle.nn.Layer:
    """The untrained model of a checkpoint of stage `cfg.Global.stage` (resolved config)."""
    return stage_spec(cfg.Global.stage).build_model(cfg, ckpt_dir)


def export_graphs(model: paddle.nn.Layer, cfg: Config, batch_size: int) -> list[ExportGraph]:
    """The graphs of stage `cfg.Global.stage` to export, or ConfigError saying why it has none."""
    spec = stage_spec(cfg.Global.stage)
    if spec.export is None:
        raise ConfigError(f"stage {spec.name!r} has no export: {spec.no_export_reason}")
    return spec.export(model, cfg, batch_size)


__all__ = ["STAGES", "ExportGraph", "StageSpec", "build_bare_model", "export_graphs", "prepare", "stage_spec"]
