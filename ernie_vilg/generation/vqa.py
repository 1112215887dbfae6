"""Generative VQA answers (paper sec. 4.4): decoding with the question as a source prefix, exact-match
scoring, and the checkpoint pipelines behind tools/vqa.py.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import paddle

from ernie_vilg.config import Config
from ernie_vilg.data.vqa_batches import encode_question, record_question
from ernie_vilg.generation.decoding import (
    SamplingParams,
    TextSpecials,
    beam_search_answer_tokens,
    generate_answer_tokens,
)


def answer_questions(model: Any, tok: Any, image_ids: np.ndarray, questions: Sequence[str],
                     max_question_len: int, max_answer_len: int, strategy: str = "greedy", beam_size: int = 3,
                     length_penalty: float = 1.0, batch_size: int = 32, use_cache: bool = True,
                     progress: bool = False) -> list[str]:
    """Answers for image token grids [N, h, w] and N questions. Questions are grouped by their id
    length (the cache is prefilled with image + question, one length per call). `progress`: a bar
    in questions."""
    from ernie_vilg.runtime import progress_bar

    if strategy not in ("greedy", "beam"):
        raise ValueError(f"VQA decoding: unknown strategy {strategy!r} (known: greedy, beam)")
    specials = TextSpecials(tok.cls_id, tok.sep_id, tok.pad_id)
    encoded = [encode_question(tok, q, max_question_len) for q in questions]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    answers: list[str] = [""] * len(questions)
    images = np.asarray(image_ids, dtype=np.int64)
    bar = progress_bar(len(questions), "VQA", "question", progress)
    for P, members in sorted(groups.items()):
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            q = np.asarray([encoded[i] for i in rows], dtype=np.int64)  # [b, P]
            if strategy == "beam":
                seqs = beam_search_answer_tokens(model, images[rows], q, specials, beam_size, length_penalty,
                                                 max_answer_len, use_cache)
            else:
                seqs = generate_answer_tokens(model, images[rows], q, specials, SamplingParams(greedy=True),
                                              max_answer_len, use_cache=use_cache)
            for i, seq in zip(rows, seqs):
                answers[i] = tok.decode(seq)
            bar.update(len(rows))
    bar.close()
    return answers


def score_answers(preds: Sequence[str], refs: Sequence[Sequence[str]], qtypes: Optional[Sequence[str]] = None
                  ) -> dict[str, float]:
    """Exact match (0-100) overall, and per question kind when `qtypes` is given (`em_<qtype>`)."""
    from ernie_vilg.metrics.vqa import char_f1, exact_match

    if len(preds) != len(refs) or not refs:
        raise ValueError(f"{len(preds)} answers for {len(refs)} questions")
    em = [exact_match(p, r) for p, r in zip(preds, refs)]
    out = {"exact_match": 100.0 * float(np.mean(em)),
           "char_f1": 100.0 * float(np.mean([char_f1(p, r) for p, r in zip(preds, refs)])), "count": len(refs)}
    if qtypes is not None:
        kinds: dict[str, list[float]] = defaultdict(list)
        for kind, value in zip(qtypes, em):
            kinds[str(kind)].append(value)
        for kind in sorted(kinds):
            out[f"em_{kind}"] = 100.0 * float(np.mean(kinds[kind]))
            out[f"n_{kind}"] = len(kinds[kind])
    return out


def evaluate_shards(model: Any, tok: Any, shards: Any, cfg: Config, max_items: int = 0,
                    strategy: Optional[str] = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Answer the first `max_items` (0 = all) rows of VQA shards; (scores, one record per row)."""
    count = len(shards) if max_items <= 0 else min(max_items, len(shards))
    recs = [shards[i] for i in range(count)]
    questions = [record_question(r) for r in recs]
    refs = [r.texts or [r.text] for r in recs]
    gen = cfg.Generation
    strategy = strategy or ("beam" if gen.decode_strategy == "beam" else "greedy")
    was_training = model.training
    model.eval()
    with paddle.no_grad():
        preds = answer_questions(model, tok, np.stack([r.image_ids for r in recs]), questions,
                                 cfg.VQA.max_question_len, cfg.VQA.max_answer_len, strategy, gen.beam_size,
                                 gen.length_penalty, cfg.Data.batch_size)
    if was_training:
        model.train()
    qtypes = [str(r.meta.get("qtype", "all")) for r in recs]
    rows = [{"id": r.meta.get("id", i), "question": q, "answer": p, "references": ref, "qtype": k}
            for i, (r, q, p, ref, k) in enumerate(zip(recs, questions, preds, refs, qtypes))]
    return score_answers(preds, refs, qtypes), rows


def _strategy(bundle: Any, strategy: Optional[str]) -> str:
    return strategy or ("beam" if bundle.cfg.Generation.decode_strategy == "beam" else "greedy")


def _answer_ids(bundle: Any, image_ids: np.ndarray, questions: Sequence[str], strategy: Optional[str],
                batch_size: int) -> list[str]:
    cfg = bundle.cfg
    # a bar when a manifest / shard folder is answered (tools/vqa.py batch modes), not for one question
    return answer_questions(bundle.model, bundle.text_tokenizer, image_ids, questions, cfg.VQA.max_question_len,
                            cfg.VQA.max_answer_len, _strategy(bundle, strategy), cfg.Generation.beam_size,
                            cfg.Generation.length_penalty, batch_size, progress=len(questions) > 1)


def encode_image_files(bundle: Any, paths: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
    """Image files -> token grids [N, h, w] with the checkpoint's image tokenizer."""
    from ernie_vilg.data.images import load_image

    if bundle.image_tokenizer is None:
        raise FileNotFoundError(f"{bundle.ckpt_dir}: no image tokenizer to encode images")
    out = []
    for start in range(0, len(paths), batch_size):
        pixels = np.stack([load_image(p, bundle.image_size) for p in paths[start:start + batch_size]])
        with paddle.no_grad():
            out.append(bundle.image_tokenizer.encode_to_ids(paddle.to_tensor(pixels)).numpy())
    return np.concatenate(out).astype(np.int64)


def answer_image_questions(bundle: Any, image_paths: Sequence[str | Path], questions: Sequence[str],
                           strategy: Optional[str] = None, batch_size: int = 32) -> list[str]:
    """One answer per (image file, question)."""
    if len(image_paths) != len(questions):
        raise ValueError(f"{len(image_paths)} images for {len(questions)} questions")
    return _answer_ids(bundle, encode_image_files(bundle, image_paths, batch_size), questions, strategy, batch_size)


def _write_answers(rows: list[dict[str, Any]], out: Optional[str | Path]) -> None:
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)


def _summary(rows: list[dict[str, Any]], out: Optional[str | Path]) -> dict[str, Any]:
    summary: dict[str, Any] = {"questions": len(rows), "out": str(out) if out else None}
    scored = [r for r in rows if r.get("references")]
    if scored:
        summary.update(score_answers([r["answer"] for r in scored], [r["references"] for r in scored],
                                     [str(r.get("qtype", "all")) for r in scored]))
    return summary


def answer_manifest(bundle: Any, manifest: str | Path, out: Optional[str | Path] = None,
                    strategy: Optional[str] = None, batch_size: int = 32, limit: int = 0) -> dict[str, Any]:
    """Answer every line of a VQA manifest (`image`, `question`; `text` / `texts` = references,
    optional). Writes one JSON line per question to `out`; scores exact match when references exist."""
    from ernie_vilg.data.manifest import ManifestError, iter_manifest

    recs = []
    for rec in iter_manifest(Path(manifest), strict=True, require_text=False):
        if not isinstance(rec.extra.get("question"), str) or not rec.extra["question"].strip():
            raise ManifestError(f"{manifest}:{rec.line_no}", "missing 'question' field")
        recs.append(rec)
        if limit and len(recs) >= limit:
            break
    answers = answer_image_questions(bundle, [r.image_path for r in recs], [r.extra["question"] for r in recs],
                                     strategy, batch_size)
    rows = []
    for i, (rec, answer) in enumerate(zip(recs, answers)):
        row = {"id": rec.extra.get("id", i), "image": rec.extra.get("_image_raw", rec.image_path),
               "question": rec.extra["question"], "answer": answer}
        if rec.texts:
            row["references"] = list(rec.texts)
        if "qtype" in rec.extra:
            row["qtype"] = rec.extra["qtype"]
        rows.append(row)
    _write_answers(rows, out)
    return _summary(rows, out)


def answer_shards(bundle: Any, shards_dir: str | Path, out: Optional[str | Path] = None,
                  strategy: Optional[str] = None, batch_size: int = 32, limit: int = 0) -> dict[str, Any]:
    """As `answer_manifest`, on VQA token shards (images already tokenized; no image tokenizer)."""
    from ernie_vilg.data.token_shards import TokenShards

    shards = TokenShards(shards_dir)
    count = len(shards) if limit <= 0 else min(limit, len(shards))
    recs = [shards[i] for i in range(count)]
    questions = [record_question(r) for r in recs]
    answers = _answer_ids(bundle, np.stack([r.image_ids for r in recs]), questions, strategy, batch_size)
    rows = []
    for i, (rec, q, answer) in enumerate(zip(recs, questions, answers)):
        row = {"id": rec.meta.get("id", i), "image": rec.meta.get("image"), "question": q, "answer": answer,
               "references": rec.texts or [rec.text]}
        if "qtype" in rec.meta:
            row["qtype"] = rec.meta["qtype"]
        rows.append(row)
    _write_answers(rows, out)
    return _summary(rows, out)
