"""Generation speed of the quickstart's evaluation work, on a random model of the shapes size.

    python benchmarks/generation_speed.py --threads 2 [--texts 64 --candidates 8]

Times three things the quickstart's evaluation does (`generation/evaluate.py`), with the KV cache:
text-to-image sampling of `--texts` prompts x `--candidates` samples (64 image tokens each,
top-k 4), the model's own caption log-likelihood of every sample (the best-of-N ranking), and
beam-3 captions of `--texts` images. The model is configs/vilg/shapes.yaml's with random
weights (speed does not depend on the weights; captions run to the full length, the worst case).
It only uses functions that existed before this session's speed work, so the same file times an
older checkout: `PYTHONPATH=OLD_CHECKOUT python benchmarks/generation_speed.py` (docs/benchmarks.md
"Training step profile" reports both, alternating).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--impl", default="", help="Model.attention_impl (default: the checkout's shapes.yaml)")
    args = p.parse_args()

    import ernie_vilg  # noqa: F401  (runtime flags before paddle loads)
    import paddle

    from ernie_vilg.config import load_config
    from ernie_vilg.generation.best_of_n import caption_log_likelihood
    from ernie_vilg.generation.decoding import (SamplingParams, TextSpecials, beam_search_text_tokens,
                                                generate_image_tokens)
    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    # the configs of the checkout whose package is imported (an older one has older keys)
    configs = os.path.join(os.path.dirname(os.path.dirname(ernie_vilg.__file__)), "configs")
    cfg = load_config(os.path.join(configs, "vilg", "shapes.yaml"),
                      ["Model.text_vocab_size=700", "Model.image_vocab_size=512", f"Model.image_grid={args.grid}"]
                      + ([f"Model.attention_impl={args.impl}"] if args.impl else []))
    paddle.seed(0)
    model = ErnieViLG(cfg.Model)
    model.eval()
    rng = np.random.default_rng(0)
    text = rng.integers(5, 700, (args.texts, 40))
    text[:, 0], text[:, -1] = 2, 3  # [CLS] .. [SEP]
    images = rng.integers(0, 512, (args.texts, args.grid, args.grid))
    specials = TextSpecials(2, 3, 0)
    out = {"threads": args.threads, "texts": args.texts, "candidates": args.candidates,
           "package": os.path.dirname(ernie_vilg.__file__)}
    with paddle.no_grad():
        t0 = time.perf_counter()
        ids = generate_image_tokens(model, text, SamplingParams(greedy=False, temperature=1.0, top_k=4),
                                    num_candidates=args.candidates, seed=0)
        out["sample_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        caption_log_likelihood(model, ids, np.repeat(text, args.candidates, axis=0), 0)
        out["rank_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        beam_search_text_tokens(model, images, specials, beam_size=3, max_new_tokens=40)
        out["beam_seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
