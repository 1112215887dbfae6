"""Our bidirectional training step next to a plain PyTorch model of the same shapes, side by side.

    python benchmarks/peer_step.py --grids 8,16,32 --threads 2 --rounds 5 --steps 5
    python benchmarks/peer_step.py --grids 6 --impl dense --to-static   # ours as a static program

The step is the vilg stage's (configs/vilg/shapes.yaml: 4 layers, hidden 128, 4 heads, 64 text
tokens, batch 16, both directions, tied heads, AdamW with global-norm clipping), on random tokens
at image grids 8, 16 and 32 (64, 256, 1,024 image tokens). The peer is written here, in about 60
lines of plain PyTorch: the same embeddings, pre-LN blocks (GELU or GEGLU feed-forward, as the
config's Model.ffn_act), tied heads and losses, with dense
masked `scaled_dot_product_attention` over each layer's sparse pattern (the masks come from
`ernie_vilg.models.sparse_masks`, so both models compute the same function), one forward per
direction, and torch's default AdamW. torch is a benchmark-only extra: `pip install torch`
(on the dev machine kind `pip install torch==2.13.0`, the CPU wheel on disk).

Each model runs in its own worker process (two OpenMP runtimes in one process spin against each
other); the workers alternate, peer then ours, for `--rounds` rounds per grid, and the table
reports the median step time over rounds. Our worker also measures, in the same process and with
the same threads, Paddle's GEMM rate at the model's FFN shape ([B * (L + n), d] x [d, 4d], no host
copy inside the timed loop) and the model FLOP/s of the step (`flops_per_token`: 6 N per token
plus the attention of each layer's sparse pattern, PaLM appendix B). Output: one JSON line per
grid, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT_VOCAB, IMAGE_VOCAB, TEXT_LEN, BATCH = 700, 512, 64, 16


def _config(grid: int, impl: str):
    from ernie_vilg.config import load_config

    kernel = 5 if grid <= 16 else 11
    overrides = [f"Model.text_vocab_size={TEXT_VOCAB}", f"Model.image_vocab_size={IMAGE_VOCAB}",
                 f"Model.image_grid={grid}", f"Model.conv_kernel={kernel}", f"Data.batch_size={BATCH}"]
    if impl:  # "" = the shipped config's attention_impl
        overrides.append(f"Model.attention_impl={impl}")
    return load_config(os.path.join(HERE, "..", "configs", "vilg", "shapes.yaml"), overrides)


def _masks(cfg) -> list[list[np.ndarray]]:
    """bool [T, T] per direction per layer (True = may attend), from our own mask definitions."""
    from ernie_vilg.models.sparse_masks import Direction, layer_kinds, stream_mask
    from ernie_vilg.models.transformer import stream_layout

    kinds = layer_kinds(cfg.Model.num_layers, "sparse_reference")
    return [[stream_mask(stream_layout(cfg.Model, d), k) for k in kinds] for d in Direction]


def _tokens(grid: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    text = rng.integers(5, TEXT_VOCAB, (BATCH, TEXT_LEN))
    text[:, 0] = 1  # [CLS]
    return text, rng.integers(0, IMAGE_VOCAB, (BATCH, grid, grid))


# ------------------------------------------------------------------------------ the PyTorch peer
def peer_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as tF

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = _config(args.grid, "sparse_reference")
    m = cfg.Model
    d, H, L, n, g = m.hidden_size, m.num_heads, TEXT_LEN, args.grid ** 2, args.grid
    gated = m.ffn_act == "geglu"

    class Block(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = tnn.LayerNorm(d), tnn.LayerNorm(d)
            self.qkv, self.proj = tnn.Linear(d, 3 * d), tnn.Linear(d, d)
            f = m.ffn_mult * d
            self.fc1, self.fc2 = tnn.Linear(d, 2 * f if gated else f), tnn.Linear(f, d)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            B, T, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)
            a = tF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
            h = self.fc1(self.ln2(x))
            if gated:  # GEGLU, as Model.ffn_act=geglu
                value, gate = h.chunk(2, dim=-1)
                return x + self.fc2(value * tF.gelu(gate, approximate="tanh"))
            return x + self.fc2(tF.gelu(h, approximate="tanh"))

    class Peer(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_txt, self.tok_img = tnn.Embedding(TEXT_VOCAB, d), tnn.Embedding(IMAGE_VOCAB, d)
            self.pos_txt, self.row, self.col = tnn.Embedding(L, d), tnn.Embedding(g, d), tnn.Embedding(g, d)
            self.dir = tnn.Embedding(2, d)
            self.blocks = tnn.ModuleList(Block() for _ in range(m.num_layers))
            self.ln_f = tnn.LayerNorm(d)
            self.bias_txt, self.bias_img = tnn.Parameter(torch.zeros(TEXT_VOCAB)), tnn.Parameter(torch.zeros(IMAGE_VOCAB))

        def forward(self, text: torch.Tensor, image: torch.Tensor, direction: int, masks: list) -> torch.Tensor:
            raster = torch.arange(n)
            t = self.tok_txt(text) + self.pos_txt(torch.arange(L))
            i = self.tok_img(image) + self.row(raster // g) + self.col(raster % g)
            x = torch.cat([t, i] if direction == 0 else [i, t], 1) + self.dir.weight[direction]
            for block, mask in zip(self.blocks, masks):
                x = block(x, mask)
            h = self.ln_f(x)
            if direction == 0:  # positions L-1 .. L+n-2 predict the image tokens
                return h[:, L - 1:L + n - 1] @ self.tok_img.weight.T + self.bias_img
            return h[:, n:n + L - 1] @ self.tok_txt.weight.T + self.bias_txt

    model = Peer()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.Optimizer.lr, betas=(cfg.Optimizer.beta1, cfg.Optimizer.beta2),
                            weight_decay=cfg.Optimizer.weight_decay)
    masks = [[torch.from_numpy(mk) for mk in per_dir] for per_dir in _masks(cfg)]
    text_np, image_np = _tokens(args.grid)
    text, image = torch.from_numpy(text_np), torch.from_numpy(image_np.reshape(BATCH, -1))

    def step() -> None:
        img_logits = model(text, image, 0, masks[0])
        txt_logits = model(text, image, 1, masks[1])
        loss = tF.cross_entropy(img_logits.reshape(-1, IMAGE_VOCAB), image.reshape(-1)) + \
            tF.cross_entropy(txt_logits.reshape(-1, TEXT_VOCAB), text[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.Optimizer.grad_clip)
        opt.step()

    return {"impl": "torch", "step_seconds": _time_steps(step, args.steps)}


# ------------------------------------------------------------------------------ ours
def ours_worker(args: argparse.Namespace) -> dict[str, Any]:
    import ernie_vilg  # noqa: F401  (runtime flags before paddle loads)
    import paddle

    from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
    from ernie_vilg.models.transformer import ErnieViLG, flops_per_token, stream_layout
    from ernie_vilg.runtime import configure_threads
    from ernie_vilg.training.trainer import build_optimizer

    configure_threads(args.threads)
    cfg = _config(args.grid, args.impl)
    m = cfg.Model
    paddle.seed(0)
    model = ErnieViLG(m)
    optimizer = build_optimizer(model, cfg)
    criterion = VilgCriterion(pad_id=0)
    text_np, image_np = _tokens(args.grid)
    text, image = paddle.to_tensor(text_np), paddle.to_tensor(image_np)

    def loss_fn(text_ids: paddle.Tensor, image_ids: paddle.Tensor) -> paddle.Tensor:
        return bidirectional_loss(model, criterion, text_ids, image_ids).total

    if args.to_static:  # dynamic-to-static (AST mode: the stream layouts are plain Python at trace time)
        loss_fn = paddle.jit.to_static(loss_fn, full_graph=True)

    def step() -> None:
        loss_fn(text, image).backward()
        optimizer.step()
        optimizer.clear_grad()

    t0 = time.perf_counter()
    step()  # the first step traces and compiles under to_static
    first_step_s = time.perf_counter() - t0
    step_s = _time_steps(step, args.steps)
    pair_tokens = sum(stream_layout(m, d).total for d in ("txt2img", "img2txt"))
    model_flops = flops_per_token(m) * pair_tokens * BATCH / step_s
    # Paddle's GEMM rate at the FFN shape of one direction's stream, same process and threads
    rows = BATCH * stream_layout(m, "txt2img").total
    a = paddle.randn([rows, m.hidden_size])
    w = paddle.randn([m.hidden_size, m.ffn_mult * m.hidden_size])
    out = None
    for _ in range(5):
        out = paddle.matmul(a, w)
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        out = paddle.matmul(a, w)
    float(out[0, 0])  # CPU kernels are synchronous; one scalar read after the loop
    gemm = reps * 2 * rows * m.hidden_size * m.ffn_mult * m.hidden_size / (time.perf_counter() - t0)
    return {"impl": m.attention_impl + ("+to_static" if args.to_static else ""),
            "step_seconds": step_s, "first_step_seconds": first_step_s, "model_gflops": model_flops / 1e9, "gemm_gflops": gemm / 1e9,
            "gemm_shape": [rows, m.hidden_size, m.ffn_mult * m.hidden_size]}


def _time_steps(step, steps: int) -> float:
    for _ in range(2):  # warm-up: allocator, masks, lazy kernels
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


# ------------------------------------------------------------------------------ driver
def _worker(which: str, grid: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--grid", str(grid),
           "--threads", str(args.threads), "--steps", str(args.steps), "--impl", args.impl or ""]
    if args.to_static:
        cmd.append("--to-static")
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.path.join(HERE, "..")))
    if out.returncode:
        raise SystemExit(f"{which} worker failed at grid {grid}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", default="8,16,32", help="image grid sides, comma separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating peer / ours rounds per grid")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (after 2 warm-up steps)")
    p.add_argument("--impl", default="", help="our Model.attention_impl (default: the shipped config's)")
    p.add_argument("--to-static", action="store_true",
                   help="run our loss through paddle.jit.to_static (full_graph) instead of eager")
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    p.add_argument("--worker", choices=["torch", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--grid", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps((peer_worker if args.worker == "torch" else ours_worker)(args)))
        return
    rows = []
    for grid in (int(g) for g in args.grids.split(",")):
        runs: dict[str, list[dict[str, Any]]] = {"torch": [], "ours": []}
        for _ in range(args.rounds):
            for which in ("torch", "ours"):
                runs[which].append(_worker(which, grid, args))
        med = lambda which, key: float(np.median([r[key] for r in runs[which]]))  # noqa: E731
        row = {"grid": grid, "image_tokens": grid * grid, "threads": args.threads, "impl": runs["ours"][0]["impl"],
               "torch_step_s": med("torch", "step_seconds"), "ours_step_s": med("ours", "step_seconds"),
               "model_gflops": med("ours", "model_gflops"), "gemm_gflops": med("ours", "gemm_gflops"),
               "gemm_shape": runs["ours"][0]["gemm_shape"], "ours_first_step_s": med("ours", "first_step_seconds"),
               "torch_all": [r["step_seconds"] for r in runs["torch"]],
               "ours_all": [r["step_seconds"] for r in runs["ours"]]}
        row["ratio"] = row["ours_step_s"] / row["torch_step_s"]
        row["fraction_of_gemm"] = row["model_gflops"] / row["gemm_gflops"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| grid | image tokens | PyTorch s/step | ours s/step | ours / PyTorch | model GFLOP/s | "
          "Paddle GEMM GFLOP/s | fraction |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['grid']} | {r['image_tokens']} | {r['torch_step_s']:.3f} | {r['ours_step_s']:.3f} | "
              f"{r['ratio']:.2f}x | {r['model_gflops']:.1f} | {r['gemm_gflops']:.1f} | {r['fraction_of_gemm']:.0%} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
