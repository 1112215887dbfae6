"""The "caption_finetune" training stage: image captioning fine-tuned from a pre-trained vilg
checkpoint (paper sec. 4.3: AIC-ICC, COCO-CN; docs/finetune.md).

It is the vilg stage (`VilgTrainModule`: streamed token-shard batches, checkpoint extras) with:

- `Finetune.init_from`: the pre-trained checkpoint. Its weights are loaded (the optimizer starts
  fresh); the architecture (`Model`) is taken from it, and the text vocab must be its vocab
  (token ids must mean the same tokens), the image grid and codebook those of the shards.
  A missing or incompatible checkpoint is a `ConfigError` naming the path.
- `Finetune.directions`: `img2txt` minimises the caption NLL only; `both` keeps Eq. 3
  (text-to-image + image-to-text).
- validation = captions of the validation split decoded as `Generation` says (greedy, or beam
  search with `beam_size` / `length_penalty`), scored with the paper's caption metrics at
  character level (BLEU-4, ROUGE-L, CIDEr; METEOR with `Finetune.with_meteor`). The stage's
  `best_metric` (`Finetune.best_metric`, CIDEr) makes the Trainer keep the best weights in
  OUTPUT/best.

`score_checkpoint` scores any vilg checkpoint on a shard folder the same way (before / after
fine-tuning):

    python -m ernie_vilg.models.finetune_module --ckpt DIR --shards DIR [--strategy beam --beam-size 3]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import paddle

from ernie_vilg.config import Config, ConfigError, GenerationConfig
from ernie_vilg.generation.decoding import SamplingParams, TextSpecials, beam_search_text_tokens, generate_text_tokens
from ernie_vilg.generation.evaluate import score_caption_dicts
from ernie_vilg.models.losses import token_nll
from ernie_vilg.models.module import VOCAB_FILE, ShardBatches, VilgTrainModule
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG
from ernie_vilg.checkpoint_io import CheckpointError, load_checkpoint_config, load_model_state, set_model_state

log = logging.getLogger(__name__)

DIRECTIONS = ("img2txt", "both")
STRATEGIES = ("greedy", "beam")  # sampling is not an evaluation decoder: its scores vary by seed


# --------------------------------------------------------------------------------------------
# Captioning and scoring
# --------------------------------------------------------------------------------------------
def decode_captions(model: ErnieViLG, tok: Any, image_ids: np.ndarray, gen: GenerationConfig,
                    batch_size: int = 32, progress: bool = False) -> list[str]:
    """Captions of image token grids [N, h, w], decoded as `gen` says (greedy or beam search,
    guided by Generation.caption_cfg_scale). `progress`: a bar in images."""
    from ernie_vilg.runtime import progress_bar

    if gen.decode_strategy not in STRATEGIES:
        raise ConfigError(f"Generation.decode_strategy={gen.decode_strategy!r}: caption evaluation decodes with "
                          f"one of {', '.join(STRATEGIES)}")
    if gen.decode_strategy == "beam" and gen.beam_size < 1:
        raise ConfigError(f"Generation.beam_size={gen.beam_size}: need >= 1")
    specials = TextSpecials(tok.cls_id, tok.sep_id, tok.pad_id)
    images = np.asarray(image_ids, dtype=np.int64)
    captions: list[str] = []
    bar = progress_bar(len(images), "captions", "image", progress)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if gen.decode_strategy == "beam":
            seqs = beam_search_text_tokens(model, chunk, specials, gen.beam_size, gen.length_penalty,
                                           gen.max_text_len, cfg_scale=gen.caption_cfg_scale)
        else:
            seqs = generate_text_tokens(model, chunk, specials, SamplingParams(greedy=True), gen.max_text_len,
                                        cfg_scale=gen.caption_cfg_scale)
        captions.extend(tok.decode(seq) for seq in seqs)
        bar.update(len(chunk))
    bar.close()
    return captions


def caption_scores(model: ErnieViLG, tok: Any, records: Sequence[Any], gen: GenerationConfig,
                   with_meteor: bool = False, batch_size: int = 32, progress: bool = False
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption `records` (token shard rows) and score them against their reference texts at
    character level (the paper's Chinese setting). Returns (`caption_*` metrics, one row per item).
    `progress`: a bar over the captioning."""
    if not records:
        raise ValueError("no items to caption")
    was_training = model.training
    model.eval()
    with paddle.no_grad():
        preds = decode_captions(model, tok, np.stack([r.image_ids for r in records]), gen, batch_size, progress)
    if was_training:
        model.train()
    refs = {str(i): list(r.texts) or [r.text] for i, r in enumerate(records)}
    metrics = score_caption_dicts({str(i): p for i, p in enumerate(preds)}, refs, with_meteor)
    rows = [{"id": i, "image": r.meta.get("image"), "caption": p, "references": refs[str(i)]}
            for i, (r, p) in enumerate(zip(records, preds))]
    return metrics, rows


def score_checkpoint(ckpt: str | Path, shards_dir: str | Path, gen: Optional[GenerationConfig] = None,
                     max_items: int = 0, with_meteor: bool = False, progress: bool = True
                     ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption metrics of a vilg checkpoint on the first `max_items` (0 = all) rows of a shard
    folder; decoding settings `gen` (default: the checkpoint's Generation section)."""
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.generation.pipelines import load_bundle

    bundle = load_bundle(ckpt)
    shards = TokenShards(shards_dir)
    count = len(shards) if max_items <= 0 else min(max_items, len(shards))
    metrics, rows = caption_scores(bundle.model, bundle.text_tokenizer, [shards[i] for i in range(count)],
                                   gen or bundle.cfg.Generation, with_meteor, progress=progress)
    metrics["count"] = float(count)
    return metrics, rows


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def _check_compatible(cfg: Config, ckpt_dir: Path, src: Config) -> None:
    """The data must speak the checkpoint's vocabularies: same text vocab, same image grid and
    codebook (the shards' info.json)."""
    from ernie_vilg.data.token_shards import read_shard_info

    where = f"Finetune.init_from={cfg.Finetune.init_from}"
    vocab = ckpt_dir / VOCAB_FILE
    if not vocab.is_file():
        raise ConfigError(f"{where}: {ckpt_dir} has no {VOCAB_FILE} (not a vilg checkpoint?)")
    if not cfg.Data.vocab_file:
        cfg.Data.vocab_file = str(vocab)  # fine-tuning keeps the pre-trained vocab
    elif Path(cfg.Data.vocab_file).read_text(encoding="utf-8") != vocab.read_text(encoding="utf-8"):
        raise ConfigError(f"{where}: Data.vocab_file={cfg.Data.vocab_file} differs from the checkpoint's "
                          f"{vocab} (text ids would mean other tokens; leave Data.vocab_file empty to use it)")
    if not cfg.Data.train_shards:
        raise ConfigError("Data.train_shards is empty (write shards with tools/tokenize_images.py)")
    info = read_shard_info(cfg.Data.train_shards)
    for key, actual in (("image_grid", int(info["grid"])), ("image_vocab_size", int(info["codebook_size"]))):
        expected = getattr(src.Model, key)
        if expected not in (0, actual):
            raise ConfigError(f"{where}: the checkpoint has Model.{key}={expected} but Data.train_shards="
                              f"{cfg.Data.train_shards} has {actual} (tokenize with the pre-training image tokenizer)")


class CaptionFinetuneModule(VilgTrainModule):
    """TrainModule of `Global.stage: caption_finetune` (docs/finetune.md)."""

    name = "caption_finetune"

    def __init__(self, cfg: Config) -> None:
        f = cfg.Finetune
        if f.directions not in DIRECTIONS:
            raise ConfigError(f"Finetune.directions={f.directions!r}: known {', '.join(DIRECTIONS)}")
        if not f.init_from:
            raise ConfigError("Finetune.init_from is empty: caption fine-tuning starts from a pre-trained "
                              "vilg checkpoint (a step folder or a run folder)")
        try:
            self.init_ckpt, src = load_checkpoint_config(f.init_from)
        except (CheckpointError, ConfigError) as exc:
            raise ConfigError(f"Finetune.init_from={f.init_from}: {exc}") from None
        if src.Global.stage not in ("vilg", "vilg_e2e", "caption_finetune"):
            raise ConfigError(f"Finetune.init_from={f.init_from}: a {src.Global.stage!r} checkpoint, "
                              "not a vilg one")
        _check_compatible(cfg, self.init_ckpt, src)
        # the weights fix the architecture; dropout is a training choice and stays this config's
        dropout = cfg.Model.dropout
        cfg.Model = copy.deepcopy(src.Model)
        cfg.Model.dropout = dropout
        super().__init__(cfg)
        self.best_metric = f.best_metric  # the Trainer keeps OUTPUT/best by this metric

    def build_model(self) -> ErnieViLG:
        model = super().build_model()
        try:
            set_model_state(model, load_model_state(self.init_ckpt), self.init_ckpt)
        except CheckpointError as exc:
            raise ConfigError(f"Finetune.init_from={self.cfg.Finetune.init_from}: {exc}") from None
        log.info("caption fine-tuning from %s (weights only; fresh optimizer)", self.init_ckpt)
        return model

    def caption_loss(self, model: ErnieViLG, batch: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """Mean NLL per caption target token (w_1 .. [SEP]), as the vilg criterion's img2txt term."""
        text_ids = batch["text_ids"]
        logits = model(text_ids, batch["image_ids"], Direction.IMG2TXT)  # [B, L - 1, V_txt]
        targets = text_ids[:, 1:]
        return token_nll(logits, targets, targets != self.text_tokenizer.pad_id)

    def training_step(self, model: ErnieViLG, batch: dict[str, paddle.Tensor], step: int
                      ) -> tuple[paddle.Tensor, dict[str, float]]:
        if self.cfg.Finetune.directions == "both":
            return super().training_step(model, batch, step)
        loss = self.caption_loss(model, batch)
        return loss, {"loss_img2txt": float(loss)}

    def validate(self, model: ErnieViLG, step: int) -> dict[str, float]:
        if self.val_shards is None:
            return {}
        f = self.cfg.Finetune
        count = len(self.val_shards) if f.eval_items <= 0 else min(f.eval_items, len(self.val_shards))
        # the loss over a few batches (cheap next to decoding), then every item captioned
        batches = ShardBatches(self.val_shards, self.text_tokenizer, self.cfg.Data.batch_size,
                               self.cfg.Data.max_text_len, self.cfg.Global.seed)
        total, seen = 0.0, 0
        for batch in batches:
            n = batch["text_ids"].shape[0]
            total += float(self.caption_loss(model, batch)) * n
            seen += n
            if seen >= min(self.cfg.Train.eval_samples, count) or batches.epoch > 0:
                break
        # a bar on rank 0 only, as the Trainer's own (decoding every val item takes minutes)
        bar = self.cfg.Train.progress_bar and os.environ.get("PADDLE_TRAINER_ID", "0") == "0"
        metrics, _ = caption_scores(model, self.text_tokenizer, [self.val_shards[i] for i in range(count)],
                                    self.cfg.Generation, f.with_meteor, self.cfg.Data.batch_size, bar)
        return {"val_loss_img2txt": total / seen, **metrics}


# --------------------------------------------------------------------------------------------
# python -m ernie_vilg.models.finetune_module: score a checkpoint on a shard folder
# --------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Caption metrics (char level) of a vilg checkpoint on token shards")
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (step folder, best/ or run folder)")
    parser.add_argument("--shards", required=True, help="token shard folder (e.g. the test split)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None, help="default: the checkpoint's")
    parser.add_argument("--beam-size", type=int, default=None)
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--max-items", type=int, default=0, help="0 = every row")
    parser.add_argument("--meteor", action="store_true", help="also METEOR (needs Java)")
    parser.add_argument("--out", default=None, help="write the captions here (JSONL)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    try:
        _, cfg = load_checkpoint_config(args.ckpt)
        gen = cfg.Generation
        gen.decode_strategy = args.strategy or gen.decode_strategy
        gen.beam_size = args.beam_size if args.beam_size is not None else gen.beam_size
        gen.length_penalty = args.length_penalty if args.length_penalty is not None else gen.length_penalty
        metrics, rows = score_checkpoint(args.ckpt, args.shards, gen, args.max_items, args.meteor)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"finetune_module: error: {exc}\n")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({"strategy": gen.decode_strategy, "beam_size": gen.beam_size, **metrics}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
