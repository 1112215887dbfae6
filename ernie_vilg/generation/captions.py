"""Captions of image token grids: the one caption decoder, and scoring against references.

`decode_captions` is what every caption in the project goes through: tools/caption.py (through
`pipelines.captions_from_ids`), the vilg stage's validation and samples page, caption fine-tuning's
validation and `score_bundle` (tools/score_captions.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import paddle

from ernie_vilg.config import DECODE_STRATEGIES, ConfigError, GenerationConfig
from ernie_vilg.generation.decoding import SamplingParams, TextSpecials, beam_search_text_tokens, generate_text_tokens

EVAL_STRATEGIES = ("greedy", "beam")  # sampling is not an evaluation decoder: its scores vary by seed
EMPTY_CAPTION = "□"  # stands in for empty captions when scoring: it matches no reference character
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def decode_captions(model: Any, tok: Any, image_ids: np.ndarray, gen: GenerationConfig,
                    strategy: Optional[str] = None, batch_size: int = 32, seed: int = 0,
                    cfg_scale: Optional[float] = None, progress: bool = False) -> list[str]:
    """Captions of image grids [N, h, w]: `strategy` (default Generation.decode_strategy) greedy,
    beam (`beam_size`, `length_penalty`) or sampling (temperature / top-k / top-p, `seed`), guided
    with `cfg_scale` (default Generation.caption_cfg_scale; 1 = none). `progress`: a bar in images."""
    from ernie_vilg.runtime import progress_bar

    strategy = strategy or gen.decode_strategy
    if strategy not in DECODE_STRATEGIES:
        raise ConfigError(f"Generation.decode_strategy: unknown {strategy!r} (known: {', '.join(DECODE_STRATEGIES)})")
    if strategy == "beam" and gen.beam_size < 1:
        raise ConfigError(f"Generation.beam_size={gen.beam_size}: need >= 1")
    scale = gen.caption_cfg_scale if cfg_scale is None else cfg_scale
    specials = TextSpecials(tok.cls_id, tok.sep_id, tok.pad_id)
    images = np.asarray(image_ids, dtype=np.int64)
    params = SamplingParams(greedy=strategy == "greedy", temperature=gen.temperature, top_k=gen.top_k,
                            top_p=gen.top_p)
    captions: list[str] = []
    bar = progress_bar(len(images), "captions", "image", progress)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if strategy == "beam":
            seqs = beam_search_text_tokens(model, chunk, specials, gen.beam_size, gen.length_penalty,
                                           gen.max_text_len, cfg_scale=scale)
        else:
            seqs = generate_text_tokens(model, chunk, specials, params, gen.max_text_len, seed, cfg_scale=scale)
        captions.extend(tok.decode(seq) for seq in seqs)
        bar.update(len(chunk))
    bar.close()
    return captions


def score_caption_dicts(preds: dict[str, str], refs: dict[str, list[str]], with_meteor: bool) -> dict[str, float]:
    """Caption metrics at character level for {id: caption} against {id: [references]}; an empty
    caption scores as a wrong one. Keys are prefixed `caption_`."""
    from ernie_vilg.metrics.caption import has_content, score_captions

    metrics = ("BLEU", "METEOR", "ROUGE-L", "CIDEr") if with_meteor else ("BLEU", "ROUGE-L", "CIDEr")
    # an empty caption (e.g. [SEP] first, early in training) scores as a wrong one, not an error
    preds = {k: v if has_content(v) else EMPTY_CAPTION for k, v in preds.items()}
    scores = score_captions(preds, refs, tokenization="char", metrics=metrics)
    return {f"caption_{k}": float(v) for k, v in scores.items() if k in CAPTION_METRICS and v is not None}


def references(rec: Any) -> list[str]:
    """A token shard row's reference captions (its `texts`, or its one `text`)."""
    return list(rec.texts) or [rec.text]


def caption_scores(model: Any, tok: Any, records: Sequence[Any], gen: GenerationConfig,
                   with_meteor: bool = False, batch_size: int = 32, progress: bool = False,
                   strategy: Optional[str] = None, cfg_scale: Optional[float] = None
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption `records` (token shard rows) with an evaluation decoder (greedy or beam) and score
    them against their references at character level (the paper's Chinese setting). Returns
    (`caption_*` metrics, one row per item)."""
    strategy = strategy or gen.decode_strategy
    if strategy not in EVAL_STRATEGIES:
        raise ConfigError(f"Generation.decode_strategy={strategy!r}: caption evaluation decodes with "
                          f"one of {', '.join(EVAL_STRATEGIES)}")
    if not records:
        raise ValueError("no items to caption")
    was_training = model.training
    model.eval()
    with paddle.no_grad():
        preds = decode_captions(model, tok, np.stack([r.image_ids for r in records]), gen, strategy, batch_size,
                                cfg_scale=cfg_scale, progress=progress)
    if was_training:
        model.train()
    refs = {str(i): references(r) for i, r in enumerate(records)}
    metrics = score_caption_dicts({str(i): p for i, p in enumerate(preds)}, refs, with_meteor)
    rows = [{"id": i, "image": r.meta.get("image"), "caption": p, "references": refs[str(i)]}
            for i, (r, p) in enumerate(zip(records, preds))]
    return metrics, rows


def score_bundle(bundle: Any, shards_dir: str | Path, gen: Optional[GenerationConfig] = None, max_items: int = 0,
                 with_meteor: bool = False, progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption metrics of a loaded checkpoint (`VilgBundle`) on the first `max_items` (0 = all)
    rows of a shard folder; decoding settings `gen` (default: the checkpoint's Generation)."""
    from ernie_vilg.data.token_shards import TokenShards

    shards = TokenShards(shards_dir)
    count = len(shards) if max_items <= 0 else min(max_items, len(shards))
    metrics, rows = caption_scores(bundle.model, bundle.text_tokenizer, [shards[i] for i in range(count)],
                                   gen or bundle.cfg.Generation, with_meteor, progress=progress)
    metrics["count"] = float(count)
    return metrics, rows
