"""The contrastive reranker as a TrainModule (`Global.stage: reranker`) for the one Trainer.

Data: image-text manifests through `ImageBatches` (pixels, center crop at Data.image_size).
Each step pairs every image with one of its reference texts, picked by `default_rng([seed,
step])` so a resumed run sees the same texts. Text ids come from the project's WordPiece
tokenizer: Data.vocab_file, or (when empty) a vocab built from the train and val manifests into
Global.output_dir/vocab.txt. The checkpoint carries vocab.txt and reranker.json, so
`models.reranker.load_reranker(CKPT)` needs nothing else.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paddle

from ernie_vilg.config import Config, ConfigError
from ernie_vilg.data.images import ImageBatches, ImageError, load_image
from ernie_vilg.data.manifest import read_manifest
from ernie_vilg.models.reranker import (
    RERANKER_INFO_FILE, VOCAB_FILE, DualEncoder, build_dual_encoder, text_ids,
)
from ernie_vilg.stages.spec import ExportGraph
from ernie_vilg.training.module import StepContext, TrainModule


def resolve_vocab(cfg: Config) -> Path:
    """Data.vocab_file, or a vocab built once from the manifests into the run folder."""
    if cfg.Data.vocab_file:
        path = Path(cfg.Data.vocab_file)
        if not path.is_file():
            raise ConfigError(f"Data.vocab_file: {path} not found")
        return path
    path = Path(cfg.Global.output_dir) / VOCAB_FILE
    if not path.is_file():
        from ernie_vilg.text.vocab import build_vocab

        manifests = [m for m in (cfg.Data.train_manifest, cfg.Data.val_manifest) if m]
        build_vocab(manifests, path)
    return path


def resolve(cfg: Config) -> Config:
    """A copy of `cfg` whose Data.vocab_file is set (built from the manifests when empty)."""
    if not cfg.Data.train_manifest:
        raise ConfigError("Data.train_manifest: required for the reranker stage")
    out = copy.deepcopy(cfg)
    out.Data.vocab_file = str(resolve_vocab(cfg))
    return out


def build_bare_model(cfg: Config, ckpt_dir: Optional[Path] = None) -> DualEncoder:
    """The dual encoder of a reranker checkpoint: its own vocab.txt (or Data.vocab_file) sets the
    text embedding's size and padding id."""
    from ernie_vilg.text.tokenizer import TextTokenizer

    vocab = Path(ckpt_dir) / VOCAB_FILE if ckpt_dir is not None and (Path(ckpt_dir) / VOCAB_FILE).is_file() \
        else Path(cfg.Data.vocab_file)
    if not vocab.is_file():
        raise ConfigError(f"reranker: no vocab at {vocab} (a reranker checkpoint carries its {VOCAB_FILE})")
    tok = TextTokenizer(vocab)
    return build_dual_encoder(cfg.Reranker, tok.vocab_size, cfg.Data.max_text_len, tok.pad_id)


class _Embed(paddle.nn.Layer):
    """One tower of the dual encoder as a layer of its own (the model is a sublayer, so its
    parameters are this layer's: paddle.jit.save needs that)."""

    def __init__(self, model: DualEncoder, tower: str) -> None:
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.model.embed_images(x) if self.tower == "images" else self.model.embed_texts(x)


def export_reranker(model: DualEncoder, cfg: Config, batch_size: int) -> list[ExportGraph]:
    """`reranker_images` and `reranker_texts`: unit embeddings whose dot product is the pair's
    cosine (the calibrated score adds the checkpoint's `calib_a` / `calib_b`: sigmoid(a cos + b))."""
    size, L, d = cfg.Data.image_size, cfg.Data.max_text_len, cfg.Reranker.embed_dim
    return [
        ExportGraph("reranker_images", _Embed(model, "images"),
                    [paddle.static.InputSpec([None, 3, size, size], "float32", "images")],
                    [{"name": "images", "shape": [-1, 3, size, size], "dtype": "float32"}],
                    [{"name": "embeddings", "shape": [-1, d], "dtype": "float32"}],
                    "images in [-1, 1] (center crop at Data.image_size) -> unit embeddings"),
        ExportGraph("reranker_texts", _Embed(model, "texts"),
                    [paddle.static.InputSpec([None, L], "int64", "text_ids")],
                    [{"name": "text_ids", "shape": [-1, L], "dtype": "int64"}],
                    [{"name": "embeddings", "shape": [-1, d], "dtype": "float32"}],
                    "text ids ([CLS] ... [SEP], padded) -> unit embeddings"),
    ]


class RerankerTrainModule(TrainModule):
    name = "reranker"

    def __init__(self, cfg: Config) -> None:
        from ernie_vilg.text.tokenizer import TextTokenizer

        super().__init__(cfg)
        self.vocab_file = Path(cfg.Data.vocab_file)
        self.tokenizer = TextTokenizer(self.vocab_file)
        self._val: Optional[tuple[np.ndarray, list[str]]] = None

    def build_model(self) -> paddle.nn.Layer:
        paddle.seed(self.cfg.Global.seed)
        return build_dual_encoder(self.cfg.Reranker, self.tokenizer.vocab_size, self.cfg.Data.max_text_len,
                                  self.tokenizer.pad_id)

    def train_batches(self, rank: int, world_size: int) -> ImageBatches:
        d = self.cfg.Data
        return ImageBatches(d.train_manifest, d.image_size, d.batch_size, self.cfg.Global.seed, rank, world_size)

    def _text_ids(self, texts: list[str]) -> paddle.Tensor:
        return text_ids(self.tokenizer, texts, self.cfg.Data.max_text_len)

    def training_step(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[paddle.Tensor, dict[str, float]]:
        rng = np.random.default_rng([self.cfg.Global.seed, ctx.step])
        texts = [r.texts[int(rng.integers(len(r.texts)))] if r.texts else r.text for r in batch["records"]]
        images = paddle.to_tensor(batch["images"], dtype="float32")  # [B, 3, S, S] in [-1, 1]
        out = ctx(images, self._text_ids(texts))
        labels = np.arange(len(texts))
        acc = float((out.logits.argmax(-1).numpy() == labels).mean())
        return out.loss, {
            "contrastive": float(out.contrastive_loss), "calibration": float(out.calibration_loss),
            "temperature": float(1.0 / ctx.model.logit_scale()), "batch_i2t_acc": acc,
        }

    def _val_data(self) -> Optional[tuple[np.ndarray, list[str]]]:
        if self._val is None and self.cfg.Data.val_manifest:
            images, texts = [], []
            for rec in read_manifest(self.cfg.Data.val_manifest):
                if len(images) >= self.cfg.Train.eval_samples:
                    break
                try:
                    images.append(load_image(rec.image_path, self.cfg.Data.image_size))
                except ImageError:
                    continue
                texts.append(rec.text)
            if len(images) >= 2:
                self._val = (np.stack(images), texts)
        return self._val

    def validate(self, model: paddle.nn.Layer, step: int) -> dict[str, float]:
        data = self._val_data()
        if data is None:
            return {}
        return evaluate_pairs(model, data[0], data[1], self._text_ids, self.cfg.Data.batch_size)

    def save_extras(self, model: paddle.nn.Layer, ckpt_dir: Path) -> None:
        shutil.copyfile(self.vocab_file, Path(ckpt_dir) / VOCAB_FILE)
        info = {"image_size": self.cfg.Data.image_size, "max_text_len": self.cfg.Data.max_text_len,
                "score": "sigmoid(a * cos + b), class-balanced calibration (models/reranker.py)"}
        (Path(ckpt_dir) / RERANKER_INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")


@paddle.no_grad()
def evaluate_pairs(model: DualEncoder, images: np.ndarray, texts: list[str], encode: Any,
                   batch_size: int = 64) -> dict[str, float]:
    """Retrieval and threshold metrics on N held-out pairs: i2t / t2i top-1 among all N, mean
    score of matching pairs and of mismatched ones (image i with text i+1), and the balanced
    accuracy of the 0.5 threshold on those two sets."""
    img = paddle.concat([model.embed_images(paddle.to_tensor(images[i: i + batch_size]))
                         for i in range(0, len(images), batch_size)])
    txt = paddle.concat([model.embed_texts(encode(texts[i: i + batch_size]))
                         for i in range(0, len(texts), batch_size)])
    cos = img @ txt.T  # [N, N]
    n = cos.shape[0]
    labels = np.arange(n)
    cos_np = cos.numpy()
    match = model.calibrated(paddle.to_tensor(np.diag(cos_np).copy())).numpy()
    mismatch = model.calibrated(paddle.to_tensor(cos_np[labels, (labels + 1) % n].copy())).numpy()
    return {
        "i2t_top1": float((cos_np.argmax(1) == labels).mean()),
        "t2i_top1": float((cos_np.argmax(0) == labels).mean()),
        "score_match": float(match.mean()),
        "score_mismatch": float(mismatch.mean()),
        "threshold_acc": float(0.5 * ((match > 0.5).mean() + (mismatch <= 0.5).mean())),
        "pairs": float(n),
    }
