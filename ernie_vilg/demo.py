"""The web demo behind `tools/demo.py` (gradio, the optional `[demo]` extra): three tabs over one
ErnieViLGPipeline.

    Text -> image    prompt, candidates, seed, guidance scale, top-k, reranking (none / the
                     model's own caption likelihood / the contrastive reranker / both)
    Image -> caption greedy or beam search
    VQA              an image and a question

Every handler returns its outputs plus a status line; an exception becomes "Error: ..." in that
line (the page stays usable, the server keeps running). The handlers are plain functions
(`Handlers`), so they are tested without a browser too.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from ernie_vilg.pipeline import ErnieViLGPipeline

log = logging.getLogger(__name__)
RERANK_CHOICES = ("none", "likelihood", "reranker", "both")


def _error(exc: BaseException) -> str:
    log.warning("demo request failed: %s: %s", type(exc).__name__, exc)
    return f"Error: {' '.join(str(exc).split()) or type(exc).__name__}"


class Handlers:
    """What the buttons do. `reranker`: a loaded contrastive reranker, or None (then ranking by
    the reranker says so in the status line)."""

    def __init__(self, pipe: ErnieViLGPipeline, reranker: Optional[Any] = None, max_candidates: int = 8) -> None:
        self.pipe, self.reranker, self.max_candidates = pipe, reranker, max_candidates

    def text_to_image(self, text: str, candidates: float, seed: float, cfg_scale: float, top_k: float,
                      rerank: str) -> tuple[list[tuple[Any, str]], str]:
        """-> (gallery items (image, label), status)."""
        try:
            text = (text or "").strip()
            if not text:
                raise ValueError("type a prompt first")
            n = int(candidates)
            if not 1 <= n <= self.max_candidates:
                raise ValueError(f"candidates must be in [1, {self.max_candidates}], got {n}")
            kw = {"seed": int(seed), "cfg_scale": float(cfg_scale), "top_k": int(top_k)}
            if rerank == "none":
                images = self.pipe(text, num_images=n, **kw)
                return [(img, f"sample {i}") for i, img in enumerate(images)], f"{n} image(s) for {text!r}"
            if rerank not in RERANK_CHOICES:
                raise ValueError(f"unknown reranking {rerank!r}")
            if rerank in ("reranker", "both") and self.reranker is None:
                raise ValueError("no reranker loaded: start the demo with --reranker DIR")
            images, scores = self.pipe.best_of(text, n, rerank, self.reranker, **kw)
            labels = [f"rank {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()) for r, s in enumerate(scores)]
            return list(zip(images, labels)), f"{n} image(s) for {text!r}, best first by {rerank}"
        except Exception as exc:  # the page shows it; the server keeps serving
            return [], _error(exc)

    def caption(self, image: Optional[np.ndarray], strategy: str, beam_size: float) -> tuple[str, str]:
        """-> (caption, status)."""
        try:
            if image is None:
                raise ValueError("upload an image first")
            caption = self.pipe.caption(np.asarray(image, dtype=np.uint8), strategy=strategy,
                                        beam_size=int(beam_size) if strategy == "beam" else None)
            return caption, f"{strategy} decoding"
        except Exception as exc:
            return "", _error(exc)

    def answer(self, image: Optional[np.ndarray], question: str, strategy: str) -> tuple[str, str]:
        """-> (answer, status)."""
        try:
            if image is None:
                raise ValueError("upload an image first")
            if not (question or "").strip():
                raise ValueError("type a question first")
            return self.pipe.answer(np.asarray(image, dtype=np.uint8), question.strip(), strategy), f"{strategy} decoding"
        except Exception as exc:
            return "", _error(exc)


def build_demo(handlers: Handlers, title: str = "ERNIE-ViLG") -> Any:
    """The gradio Blocks app (elem_ids are what tests/test_demo.py drives)."""
    import gradio as gr

    gen = handlers.pipe.config.Generation
    codebook = handlers.pipe.config.Model.image_vocab_size
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nBidirectional text-image generation. Checkpoint: `{handlers.pipe.bundle.ckpt_dir}`")
        with gr.Tab("Text → image", elem_id="tab-t2i"):
            prompt = gr.Textbox(label="Prompt", elem_id="t2i-prompt")
            with gr.Row():
                candidates = gr.Slider(1, handlers.max_candidates, value=1, step=1, label="Candidates",
                                       elem_id="t2i-candidates")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="t2i-seed")
                cfg_scale = gr.Slider(1.0, 6.0, value=float(gen.cfg_scale), step=0.5, label="Guidance scale",
                                      elem_id="t2i-cfg")
                top_k = gr.Slider(0, codebook, value=int(gen.top_k), step=1, label="Top-k (0 = off)",
                                  elem_id="t2i-topk")
                rerank = gr.Radio(list(RERANK_CHOICES), value="none", label="Reranking", elem_id="t2i-rerank")
            go = gr.Button("Generate", elem_id="t2i-run")
            gallery = gr.Gallery(label="Images", elem_id="t2i-gallery", columns=4, object_fit="contain")
            t2i_status = gr.Markdown(elem_id="t2i-status")
            go.click(handlers.text_to_image, [prompt, candidates, seed, cfg_scale, top_k, rerank], [gallery, t2i_status])
        with gr.Tab("Image → caption", elem_id="tab-caption"):
            cap_image = gr.Image(type="numpy", label="Image", elem_id="cap-image")
            with gr.Row():
                strategy = gr.Radio(["greedy", "beam"], value="greedy", label="Decoding", elem_id="cap-strategy")
                beam = gr.Slider(1, 8, value=max(1, int(gen.beam_size)), step=1, label="Beam size", elem_id="cap-beam")
            cap_go = gr.Button("Caption", elem_id="cap-run")
            caption = gr.Textbox(label="Caption", elem_id="cap-output", interactive=False)
            cap_status = gr.Markdown(elem_id="cap-status")
            cap_go.click(handlers.caption, [cap_image, strategy, beam], [caption, cap_status])
        with gr.Tab("VQA", elem_id="tab-vqa"):
            vqa_image = gr.Image(type="numpy", label="Image", elem_id="vqa-image")
            question = gr.Textbox(label="Question", elem_id="vqa-question")
            vqa_strategy = gr.Radio(["greedy", "beam"], value="greedy", label="Decoding", elem_id="vqa-strategy")
            vqa_go = gr.Button("Answer", elem_id="vqa-run")
            answer = gr.Textbox(label="Answer", elem_id="vqa-output", interactive=False)
            vqa_status = gr.Markdown(elem_id="vqa-status")
            vqa_go.click(handlers.answer, [vqa_image, question, vqa_strategy], [answer, vqa_status])
    return app
