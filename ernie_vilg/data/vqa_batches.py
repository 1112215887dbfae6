"""VQA streams from token shards: `[CLS] question [SEP] answer [SEP]` ids and their batches.

A VQA shard row is one question: its image's token ids, the question in the row's meta, the
answers as its texts (`tools/tokenize_images.py` on a VQA manifest).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from ernie_vilg.config import ConfigError
from ernie_vilg.data.pair_batches import ShardBatches
from ernie_vilg.text.tokenizer import pad_ids


def encode_question(tok: Any, question: str, max_question_len: int) -> list[int]:
    """`[CLS] question [SEP]`, at most `max_question_len` ids: the source text prefix."""
    return tok.encode(question, max_question_len)


def encode_qa(tok: Any, question: str, answer: str, max_question_len: int, max_answer_len: int
              ) -> tuple[list[int], int]:
    """(`[CLS] question [SEP] answer [SEP]` ids, P = length of the question part)."""
    q = encode_question(tok, question, max_question_len)
    a = tok.encode(answer, max_answer_len + 1)[1:]  # drop [CLS]: answer [SEP]
    return q + a, len(q)


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
