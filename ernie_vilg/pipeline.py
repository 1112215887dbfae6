"""The Python API for users: one object that generates in both directions.

    from ernie_vilg import ErnieViLGPipeline
    pipe = ErnieViLGPipeline.from_pretrained("runs/pretrained")   # or any vilg checkpoint folder
    images = pipe("一个红色的圆形", num_images=4, seed=0, cfg_scale=2.0)   # PIL images
    pipe.caption(images)                                          # one caption per image
    pipe.answer(images[0], "什么颜色?")                            # generative VQA
    pipe.complete(images[0], keep_rows=3, text="一个蓝色的方形")     # keep the top rows, redo the rest

Images go in as PIL images, file paths or uint8 arrays [H, W, 3]; they are center-cropped and
resized to the model's Data.image_size, as in training. Defaults come from the checkpoint's
Generation section; every call can override them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

ImageLike = Union["PIL.Image.Image", str, Path, np.ndarray]  # noqa: F821


def load_bundle(ckpt: str | Path, need_image_tokenizer: bool = False) -> Any:
    """A loaded checkpoint (`generation.pipelines.VilgBundle`: model in eval mode, text and image
    tokenizers, resolved config) of any stage that generates: vilg, vilg_e2e, caption_finetune,
    vqa, or a pretrained folder. The model is the stage registry's (`ernie_vilg.stages`)."""
    from ernie_vilg.generation.pipelines import bundle_from_checkpoint
    from ernie_vilg.stages import build_bare_model

    return bundle_from_checkpoint(ckpt, build_bare_model, need_image_tokenizer)


class ErnieViLGPipeline:
    """Text -> image, image -> text, VQA and image completion over one loaded checkpoint
    (`generation.pipelines.VilgBundle`)."""

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle

    @classmethod
    def from_pretrained(cls, path: str | Path, threads: int = 0) -> "ErnieViLGPipeline":
        """Load a pretrained folder (tools/convert_checkpoint.py to-pretrained) or any vilg
        checkpoint folder / run folder. `threads`: CPU threads (0 = all cores)."""
        from ernie_vilg.runtime import configure_threads

        if threads:
            configure_threads(threads)
        return cls(load_bundle(path, need_image_tokenizer=True))

    @property
    def config(self) -> Any:
        return self.bundle.cfg

    # ------------------------------------------------------------------ inputs / outputs
    def _pixels(self, images: Sequence[ImageLike]) -> np.ndarray:
        """float32 [N, 3, S, S] in [-1, 1], preprocessed as in training."""
        from PIL import Image

        from ernie_vilg.data.images import center_crop_resize, normalize, open_image, to_rgb

        size = self.bundle.cfg.Data.image_size
        out = []
        for img in images:
            if isinstance(img, (str, Path)):
                img = open_image(img)
            elif isinstance(img, np.ndarray):
                if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                    raise ValueError(f"an image array must be uint8 [H, W, 3], got {img.dtype} {list(img.shape)}")
                img = Image.fromarray(img)
            elif not isinstance(img, Image.Image):
                raise TypeError(f"expected a PIL image, a path or a uint8 array, got {type(img).__name__}")
            out.append(normalize(center_crop_resize(to_rgb(img), size)))
        return np.stack(out)

    def encode_images(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Image token grids int64 [N, h, w]."""
        import paddle

        pixels = self._pixels(_as_list(images))
        with paddle.no_grad():
            return self.bundle.image_tokenizer.encode_to_ids(paddle.to_tensor(pixels)).numpy().astype(np.int64)

    def _sampling(self, temperature: Optional[float], top_k: Optional[int], top_p: Optional[float]) -> Any:
        from ernie_vilg.generation.decoding import SamplingParams

        gen = self.bundle.cfg.Generation
        params = SamplingParams(greedy=False, temperature=gen.temperature if temperature is None else temperature,
                                top_k=gen.top_k if top_k is None else top_k, top_p=gen.top_p if top_p is None else top_p)
        if params.temperature <= 0 or params.top_k < 0 or not 0 < params.top_p <= 1:
            raise ValueError(f"need temperature > 0, top_k >= 0, 0 < top_p <= 1; got {params}")
        return params

    def _arrays(self, texts: Sequence[str], ids: np.ndarray, num_images: int) -> np.ndarray:
        from ernie_vilg.generation.pipelines import decode_generated

        # the text width of `_generate_ids`: the end-to-end reconstructor reads the same stream
        return decode_generated(self.bundle, texts, ids, num_images, text_width=self.bundle.cfg.Data.max_text_len)

    def _images(self, texts: Sequence[str], ids: np.ndarray, num_images: int) -> list[Any]:
        from PIL import Image

        return [Image.fromarray(a) for a in self._arrays(texts, ids, num_images)]

    def _generate(self, text: str | Sequence[str], num_images: int, seed: int, cfg_scale: Optional[float],
                  temperature: Optional[float], top_k: Optional[int], top_p: Optional[float],
                  prefix: Optional[np.ndarray] = None) -> list[Any]:
        texts = [text] if isinstance(text, str) else list(text)
        return self._images(texts, self._generate_ids(texts, num_images, seed, cfg_scale, temperature, top_k, top_p,
                                                      prefix), num_images)

    def _generate_ids(self, text: str | Sequence[str], num_images: int, seed: int, cfg_scale: Optional[float],
                      temperature: Optional[float], top_k: Optional[int], top_p: Optional[float],
                      prefix: Optional[np.ndarray] = None) -> np.ndarray:
        from ernie_vilg.generation.pipelines import text_to_image_ids

        texts = [text] if isinstance(text, str) else list(text)
        if not texts or num_images < 1:
            raise ValueError("need at least one text and num_images >= 1")
        if cfg_scale is not None and cfg_scale <= 0:
            raise ValueError(f"cfg_scale must be > 0, got {cfg_scale}")
        # one seed per text and a fixed text width: a text's images do not depend on the others
        seeds = [seed + i for i in range(len(texts))]
        return text_to_image_ids(self.bundle, texts, num_images, seeds, self._sampling(temperature, top_k, top_p),
                                 cfg_scale, text_width=self.bundle.cfg.Data.max_text_len, prefix_ids=prefix)

    # ------------------------------------------------------------------ the four tasks
    def __call__(self, text: str | Sequence[str], num_images: int = 1, seed: int = 0,
                 cfg_scale: Optional[float] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None) -> list[Any]:
        """Text -> `num_images` PIL images per text (texts in order, a text's images adjacent).
        `cfg_scale`: classifier-free guidance (default Generation.cfg_scale; 1 = off)."""
        return self._generate(text, num_images, seed, cfg_scale, temperature, top_k, top_p)

    def best_of(self, text: str, num_images: int, rank_by: str = "likelihood", reranker: Optional[Any] = None,
                seed: int = 0, cfg_scale: Optional[float] = None, temperature: Optional[float] = None,
                top_k: Optional[int] = None, top_p: Optional[float] = None) -> tuple[list[Any], list[dict[str, float]]]:
        """Best-of-N (paper sec. 4.2): `num_images` samples of `text`, best first, ranked by the
        model's own caption likelihood, the contrastive `reranker` (models.reranker.load_reranker)
        or both; returns (images, per-image scores)."""
        from PIL import Image

        from ernie_vilg.generation.best_of_n import rank_candidates_by, score_candidates

        ids = self._generate_ids(text, num_images, seed, cfg_scale, temperature, top_k, top_p)
        arrays = self._arrays([text], ids, num_images)
        scores = score_candidates(self.bundle, text, arrays, ids, rank_by, reranker)
        order = rank_candidates_by(scores, rank_by)
        images = [Image.fromarray(a) for a in arrays[order]]
        return images, [{k: float(v[i]) for k, v in scores.items()} for i in order]

    def caption(self, images: ImageLike | Sequence[ImageLike], strategy: Optional[str] = None,
                beam_size: Optional[int] = None, cfg_scale: Optional[float] = None) -> str | list[str]:
        """Image(s) -> caption(s): one string for one image, a list for a list. `strategy`:
        greedy | beam | sampling (default Generation.decode_strategy)."""
        from dataclasses import replace

        from ernie_vilg.generation.pipelines import captions_from_ids

        gen = self.bundle.cfg.Generation
        if beam_size is not None:
            if beam_size < 1:
                raise ValueError(f"beam_size must be >= 1, got {beam_size}")
            self.bundle.cfg.Generation = replace(gen, beam_size=beam_size)
        try:
            captions = captions_from_ids(self.bundle, self.encode_images(images), strategy, cfg_scale=cfg_scale)
        finally:
            self.bundle.cfg.Generation = gen
        return captions if _is_list(images) else captions[0]

    def answer(self, image: ImageLike, question: str, strategy: Optional[str] = None) -> str:
        """Generative VQA: the answer to `question` about `image` (greedy, or beam)."""
        from ernie_vilg.generation.vqa import answer_questions

        cfg = self.bundle.cfg
        strategy = strategy or ("beam" if cfg.Generation.decode_strategy == "beam" else "greedy")
        return answer_questions(self.bundle.model, self.bundle.text_tokenizer, self.encode_images(image), [question],
                                cfg.VQA.max_question_len, cfg.VQA.max_answer_len, strategy,
                                cfg.Generation.beam_size, cfg.Generation.length_penalty)[0]

    def complete(self, image: ImageLike, keep_rows: int, text: str, num_images: int = 1, seed: int = 0,
                 cfg_scale: Optional[float] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None) -> list[Any]:
        """Image completion / text-guided editing: keep the first `keep_rows` token rows of
        `image` and generate the rest conditioned on `text`."""
        grid = self.bundle.cfg.Model.image_grid
        if not 1 <= keep_rows <= grid:
            raise ValueError(f"keep_rows must be in [1, {grid}], got {keep_rows}")
        prefix = self.encode_images(image)[0, :keep_rows].reshape(-1)
        return self._generate(text, num_images, seed, cfg_scale, temperature, top_k, top_p, prefix)


def _is_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim == 4)


def _as_list(x: Any) -> list[Any]:
    return list(x) if _is_list(x) else [x]
