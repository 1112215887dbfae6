"""The "vqa" training stage: generative VQA (paper sec. 4.4) as image-to-text with a question prefix.

Stream and masks (`sparse_masks.py`): `[z_1..z_n, [CLS] question [SEP] answer [SEP] [PAD]..]`.
The image and `[CLS] question [SEP]` (P text positions, per sample) are the source: the question
is bidirectional and sees the whole image, image tokens keep their sparse pattern (and, with
`Model.image_sees_prefix`, also see the question). The answer is
the causal target and the loss covers only its tokens (answer + its [SEP]), never the question or
the padding (`answer_loss_mask`).

Data: VQA token shards, i.e. `tools/tokenize_images.py` run on a VQA manifest (one line per
question: `image`, `text` = the answer, `question`, optional `qtype` / `id`; FM-IQA via
`tools/convert_dataset.py --format fmiqa`, the shapes world via `tools/make_shapes_vqa.py`). Each
shard row is one question: its image's token ids, and the question / answer in the row's meta. An
image asked three questions is encoded three times; the ids are small next to the model.

The module reuses the vilg stage: `ShardBatches` (seeded, resumable epoch order), the model size
resolution and the checkpoint extras (vocab + image tokenizer copy), so `--ckpt DIR` of a VQA
run loads with the same `generation.pipelines.load_bundle`. `VQA.init_from` starts from a
pre-trained vilg checkpoint: every weight of the same shape is copied, the text embedding / head
rows are matched by token (the VQA vocab has question words a caption vocab lacks) and the text
position table by its first rows.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import paddle

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.generation.decoding import (
    SamplingParams,
    TextSpecials,
    beam_search_answer_tokens,
    generate_answer_tokens,
)
from ernie_vilg.models.losses import token_nll
from ernie_vilg.models.module import ShardBatches, VilgTrainModule, resolve_model_sizes
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG
from ernie_vilg.text.tokenizer import pad_ids

log = logging.getLogger(__name__)

Tensor = paddle.Tensor


# --------------------------------------------------------------------------------------------
# Text layout and loss mask
# --------------------------------------------------------------------------------------------
def encode_question(tok: Any, question: str, max_question_len: int) -> list[int]:
    """`[CLS] question [SEP]`, at most `max_question_len` ids: the source text prefix."""
    return tok.encode(question, max_question_len)


def encode_qa(tok: Any, question: str, answer: str, max_question_len: int, max_answer_len: int
              ) -> tuple[list[int], int]:
    """(`[CLS] question [SEP] answer [SEP]` ids, P = length of the question part)."""
    q = encode_question(tok, question, max_question_len)
    a = tok.encode(answer, max_answer_len + 1)[1:]  # drop [CLS]: answer [SEP]
    return q + a, len(q)


def answer_loss_mask(text_ids: Tensor, text_prefix: Tensor, pad_id: int) -> Tensor:
    """bool [B, L - 1]: row j (predicting text j + 1) counts iff j + 1 is an answer position
    (>= the prefix length) and not padding."""
    target_pos = paddle.arange(1, text_ids.shape[1]).unsqueeze(0)  # [1, L - 1]
    in_answer = target_pos >= text_prefix.reshape([-1, 1]).astype(target_pos.dtype)  # [B, L - 1]
    return paddle.logical_and(in_answer, text_ids[:, 1:] != pad_id)


def vqa_loss(model: ErnieViLG, batch: dict[str, Tensor], pad_id: int) -> Tensor:
    """Mean NLL per answer token (answer + its [SEP])."""
    text_ids, prefix = batch["text_ids"], batch["text_prefix"]
    logits = model(text_ids, batch["image_ids"], Direction.IMG2TXT, prefix)  # [B, L - 1, V_txt]
    return token_nll(logits, text_ids[:, 1:], answer_loss_mask(text_ids, prefix, pad_id))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def record_question(rec: Any) -> str:
    question = rec.meta.get("question")
    if not isinstance(question, str) or not question:
        raise ConfigError("a VQA token shard row has no 'question' in its meta: tokenize a VQA manifest "
                          "(tools/make_shapes_vqa.py or tools/convert_dataset.py --format fmiqa)")
    return question


class VqaBatches(ShardBatches):
    """`ShardBatches` over VQA shard rows: text ids `[CLS] q [SEP] a [SEP]` padded to the batch's
    longest, plus `text_prefix` (int64 [B]); the answer is one of the row's reference answers
    (seeded per epoch and item, as the vilg stage picks a caption)."""

    def __init__(self, shards: Any, text_tokenizer: Any, batch_size: int, max_question_len: int,
                 max_answer_len: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(shards, text_tokenizer, batch_size, max_question_len + max_answer_len, seed, rank,
                         world_size)
        self.max_question_len, self.max_answer_len = max_question_len, max_answer_len
        self._qa: dict[tuple[str, str], tuple[list[int], int]] = {}

    def _qa_ids(self, question: str, answer: str) -> tuple[list[int], int]:
        key = (question, answer)
        if key not in self._qa:  # tokenising is slow next to a tiny model's step
            self._qa[key] = encode_qa(self.tok, question, answer, self.max_question_len, self.max_answer_len)
        return self._qa[key]

    def _batch(self, items: list[int]) -> dict[str, paddle.Tensor]:
        texts, prefixes, images = [], [], []
        for i in items:
            rec = self.shards[i]
            answers = rec.texts or [rec.text]
            ids, prefix = self._qa_ids(record_question(rec), answers[self._text_choice(i, len(answers))])
            texts.append(ids)
            prefixes.append(prefix)
            images.append(rec.image_ids)
        width = max(len(t) for t in texts)
        return {"text_ids": paddle.to_tensor(pad_ids(texts, width, self.tok.pad_id)),  # [B, L]
                "image_ids": paddle.to_tensor(np.stack(images).astype(np.int64)),  # [B, h, w]
                "text_prefix": paddle.to_tensor(np.asarray(prefixes, dtype=np.int64))}  # [B]


# --------------------------------------------------------------------------------------------
# Answering and scoring (validation, tools/vqa.py)
# --------------------------------------------------------------------------------------------
def answer_questions(model: ErnieViLG, tok: Any, image_ids: np.ndarray, questions: Sequence[str],
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


def evaluate_shards(model: ErnieViLG, tok: Any, shards: Any, cfg: Config, max_items: int = 0,
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


# --------------------------------------------------------------------------------------------
# Vocab and initialisation
# --------------------------------------------------------------------------------------------
def build_vqa_vocab(manifests: Sequence[str | Path], out: str | Path) -> list[str]:
    """WordPiece vocab over the questions and answers of VQA manifests (tools/build_vocab.py reads
    only `text` / `texts`, i.e. the answers)."""
    from ernie_vilg.data.manifest import iter_manifest
    from ernie_vilg.text.vocab import build_vocab

    with tempfile.TemporaryDirectory() as tmp:
        qa = Path(tmp) / "qa.jsonl"
        with qa.open("w", encoding="utf-8") as fh:
            for manifest in manifests:
                for rec in iter_manifest(Path(manifest)):
                    texts = [str(rec.extra.get("question", "")), rec.text, *rec.texts]
                    fh.write(json.dumps({"image": "x.png", "text": texts[0] or rec.text, "texts": texts},
                                        ensure_ascii=False) + "\n")
        return build_vocab([qa], out)


def init_from_vilg(model: ErnieViLG, ckpt: str | Path, vocab: Sequence[str]) -> dict[str, int]:
    """Copy a vilg checkpoint's weights into `model` (VQA vocab `vocab`); returns counts."""
    from ernie_vilg.checkpoint_io import load_checkpoint_config, load_model_state

    ckpt_dir, _ = load_checkpoint_config(ckpt)
    src_vocab_file = ckpt_dir / "vocab.txt"
    if not src_vocab_file.is_file():
        raise ConfigError(f"VQA.init_from={ckpt}: no vocab.txt in {ckpt_dir} (not a vilg checkpoint?)")
    src_index = {t: i for i, t in enumerate(src_vocab_file.read_text(encoding="utf-8").splitlines())}
    rows = [(i, src_index[t]) for i, t in enumerate(vocab) if t in src_index]
    dst_rows, src_rows = (np.asarray(x, dtype=np.int64) for x in zip(*rows)) if rows else (np.zeros(0, np.int64),) * 2
    state = load_model_state(ckpt_dir)
    own = model.state_dict()
    new_state, counts = {}, {"copied": 0, "vocab_rows": len(rows), "partial": 0}
    from ernie_vilg.checkpoint_io import optional_state_keys

    optional = optional_state_keys(model)
    for key, target in own.items():
        if key not in state and key in optional:  # an older checkpoint: keeps its initial value
            log.warning("VQA.init_from=%s: no %s in the checkpoint, keeping its initial value", ckpt, key)
            continue
        if key not in state:
            raise ConfigError(f"VQA.init_from={ckpt}: the checkpoint has no {key} (not a vilg checkpoint?)")
        src = np.asarray(state[key].numpy() if hasattr(state[key], "numpy") else state[key])
        dst = target.numpy()
        if key.startswith(("tok_emb_txt.", "head_txt.")) and src.shape[1:] == dst.shape[1:]:
            dst[dst_rows] = src[src_rows]  # [V, d] or [V]: rows matched by token, new tokens keep their init
            new_state[key] = dst
            counts["partial"] += 1
        elif list(src.shape) == list(dst.shape):
            new_state[key] = src
            counts["copied"] += 1
        elif key.startswith("pos_emb_txt.") and src.shape[1:] == dst.shape[1:]:
            k = min(src.shape[0], dst.shape[0])
            dst[:k] = src[:k]
            new_state[key] = dst
            counts["partial"] += 1
        else:
            raise ConfigError(f"VQA.init_from={ckpt}: {key} has shape {list(src.shape)} there, "
                              f"{list(dst.shape)} here (a different Model config?)")
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in new_state.items()})
    return counts


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
class VqaTrainModule(VilgTrainModule):
    """TrainModule of `Global.stage: vqa` (checkpoint extras and image tokenizer as the vilg stage)."""

    name = "vqa"

    def __init__(self, cfg: Config) -> None:  # not VilgTrainModule.__init__: VQA needs row metadata
        from ernie_vilg.data.token_shards import TokenShards
        from ernie_vilg.text.tokenizer import TextTokenizer

        self.cfg = cfg
        if not cfg.Data.vocab_file:
            raise ConfigError("Data.vocab_file is empty (build one over questions and answers: "
                              "tools/vqa.py --build-vocab OUT --manifest M ...)")
        if not cfg.Data.train_shards:
            raise ConfigError("Data.train_shards is empty (tokenize a VQA manifest with tools/tokenize_images.py)")
        q, a = cfg.VQA.max_question_len, cfg.VQA.max_answer_len
        if q < 3 or a < 2:
            raise ConfigError(f"VQA.max_question_len={q} / max_answer_len={a}: need >= 3 / >= 2 "
                              "([CLS] q [SEP] and a [SEP])")
        if q + a > cfg.Model.max_text_len:
            raise ConfigError(f"VQA.max_question_len + max_answer_len = {q + a} exceeds "
                              f"Model.max_text_len={cfg.Model.max_text_len}")
        self.text_tokenizer = TextTokenizer(cfg.Data.vocab_file)
        self.train_shards = TokenShards(cfg.Data.train_shards)
        self.val_shards = TokenShards(cfg.Data.val_shards) if cfg.Data.val_shards else None
        record_question(self.train_shards[0])  # fail early on caption shards
        if not cfg.Data.tokenizer_ckpt:
            cfg.Data.tokenizer_ckpt = str(self.train_shards.info.get("tokenizer_ckpt", ""))
        resolve_model_sizes(cfg, self.text_tokenizer.vocab_size, self.train_shards.grid,
                            self.train_shards.codebook_size)
        self._image_tokenizer: Any = None
        self._tokenizer_missing = False

    def build_model(self) -> ErnieViLG:
        model = super().build_model()
        if self.cfg.VQA.init_from:
            vocab = Path(self.cfg.Data.vocab_file).read_text(encoding="utf-8").splitlines()
            counts = init_from_vilg(model, self.cfg.VQA.init_from, vocab)
            log.info("VQA: initialised from %s (%s)", self.cfg.VQA.init_from, counts)
        return model

    def _batches(self, shards: Any, rank: int = 0, world_size: int = 1) -> VqaBatches:
        return VqaBatches(shards, self.text_tokenizer, self.cfg.Data.batch_size, self.cfg.VQA.max_question_len,
                          self.cfg.VQA.max_answer_len, self.cfg.Global.seed, rank, world_size)

    def train_batches(self, rank: int, world_size: int) -> VqaBatches:
        return self._batches(self.train_shards, rank, world_size)

    def training_step(self, model: ErnieViLG, batch: dict[str, paddle.Tensor], step: int
                      ) -> tuple[paddle.Tensor, dict[str, float]]:
        loss = vqa_loss(model, batch, self.text_tokenizer.pad_id)
        return loss, {"loss_answer": float(loss)}

    def validate(self, model: ErnieViLG, step: int) -> dict[str, float]:
        if self.val_shards is None:
            return {}
        count = min(self.cfg.Train.eval_samples, len(self.val_shards))
        batches = self._batches(self.val_shards)
        total, seen = 0.0, 0
        for batch in batches:
            n = batch["text_ids"].shape[0]
            total += float(vqa_loss(model, batch, self.text_tokenizer.pad_id)) * n
            seen += n
            if seen >= count or batches.epoch > 0:
                break
        scores, _ = evaluate_shards(model, self.text_tokenizer, self.val_shards, self.cfg, count)
        metrics = {"val_loss_answer": total / seen}
        metrics.update({f"vqa_{k}": float(v) for k, v in scores.items() if not k.startswith("n_")})
        return metrics


# --------------------------------------------------------------------------------------------
# Checkpoint pipelines (tools/vqa.py)
# --------------------------------------------------------------------------------------------
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
