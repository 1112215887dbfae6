"""Speed and memory of the bidirectional model, each comparison measured side by side in one run.

    python benchmarks/model_benchmarks.py attention   # (a) blockwise sparse vs dense, train step
    python benchmarks/model_benchmarks.py kv_cache    # (b) image sampling, KV cache vs recompute
    python benchmarks/model_benchmarks.py throughput  # (c) shapes config: model FLOP/s vs matmul rate
    python benchmarks/model_benchmarks.py mkl --grid 8 --threads 1  # (d) (c) with / without MKL's AVX2 path
    python benchmarks/model_benchmarks.py all

(a) runs each attention implementation in its own subprocess; peak memory is the peak of Paddle's
CPU allocator during the training step minus what was allocated before it (weights, inputs), so
it counts activations, gradients and temporaries. The variants alternate over `--repeats` rounds. Results print as one JSON object per benchmark.
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


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _model_cfg(impl: str, layers: int, hidden: int, heads: int, grid: int, text_len: int,
               kernel: int, image_vocab: int = 8192, text_vocab: int = 8000):
    from ernie_vilg.config import ModelConfig

    return ModelConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, attention_impl=impl,
                       conv_kernel=kernel, text_vocab_size=text_vocab, image_vocab_size=image_vocab,
                       max_text_len=text_len, image_grid=grid, gelu_approximate=True)


def _bidirectional_loss(model: Any, text: Any, image: Any, loss: str = "separate", chunk: int = 0) -> Any:
    """L = L_txt2img + L_img2txt. `separate`: one forward per direction (the figures before issue
    19); `both`: the vilg stage's one pass over both streams (`bidirectional_loss`), with the
    chunked head + cross-entropy when `chunk` > 0 (Train.loss_chunk_tokens)."""
    from ernie_vilg.models.losses import VilgCriterion, bidirectional_loss
    from ernie_vilg.models.sparse_masks import Direction

    if loss == "both":
        return bidirectional_loss(model, VilgCriterion(pad_id=0, chunk_tokens=chunk), text, image).total
    if chunk:
        raise ValueError("--loss-chunk needs --loss both")
    criterion = VilgCriterion(pad_id=0)
    return criterion(model(text, image, Direction.TXT2IMG), image,
                     model(text, image, Direction.IMG2TXT), text).total


def attention_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One implementation: time and peak memory of forward + backward of both directions."""
    import paddle

    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    paddle.seed(0)
    cfg = _model_cfg(args.impl, args.layers, args.hidden, args.heads, args.grid, args.text_len, args.kernel)
    model = ErnieViLG(cfg)
    rng = np.random.default_rng(0)
    text = paddle.to_tensor(rng.integers(5, cfg.text_vocab_size, (args.batch, args.text_len)))
    image = paddle.to_tensor(rng.integers(0, cfg.image_vocab_size, (args.batch, args.grid, args.grid)))

    def step() -> None:
        _bidirectional_loss(model, text, image, args.loss, args.loss_chunk).backward()
        model.clear_gradients()

    stats = paddle.base.core  # Paddle's own CPU allocator statistics (bytes of live tensors)
    step()  # warm-up
    base = stats.host_memory_stat_current_value("Allocated", 0)
    stats.host_memory_stat_reset_peak_value("Allocated", 0)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = stats.host_memory_stat_peak_value("Allocated", 0)
    return {"impl": args.impl, "loss": args.loss, "loss_chunk": args.loss_chunk,
            "step_seconds": float(np.median(times)),
            "peak_step_mib": (peak - base) / 2**20, "peak_rss_mib": _rss_kib("VmHWM") / 1024.0}


def bench_attention(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {"dense": [], "sparse_blockwise": []}
    for _ in range(args.repeats):
        for impl in results:
            cmd = [sys.executable, __file__, "_attention_worker", "--impl", impl, "--steps", str(args.steps),
                   "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
                   "--grid", str(args.grid), "--text-len", str(args.text_len), "--kernel", str(args.kernel),
                   "--batch", str(args.batch), "--threads", str(args.threads), "--loss", args.loss,
                   "--loss-chunk", str(args.loss_chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary: dict[str, Any] = {"benchmark": "attention", "tokens": f"{args.text_len} text + {args.grid ** 2} image",
                               "model": f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
                                        f"conv kernel {args.kernel}, batch {args.batch}",
                               "loss": args.loss, "loss_chunk": args.loss_chunk}
    for impl, runs in results.items():
        summary[impl] = {"step_seconds": float(np.median([r["step_seconds"] for r in runs])),
                         "peak_step_mib": float(np.median([r["peak_step_mib"] for r in runs]))}
    summary["speedup_blockwise_vs_dense"] = summary["dense"]["step_seconds"] / summary["sparse_blockwise"]["step_seconds"]
    summary["memory_ratio_blockwise_vs_dense"] = (summary["sparse_blockwise"]["peak_step_mib"]
                                                  / summary["dense"]["peak_step_mib"])
    return summary


def bench_kv_cache(args: argparse.Namespace) -> dict[str, Any]:
    import paddle

    from ernie_vilg.generation.decoding import SamplingParams, generate_image_tokens
    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.runtime import configure_threads

    configure_threads(args.threads)
    paddle.seed(0)
    cfg = _model_cfg("sparse_blockwise", args.layers, args.hidden, args.heads, args.grid, args.text_len, args.kernel)
    model = ErnieViLG(cfg)
    model.eval()
    text = np.random.default_rng(0).integers(5, cfg.text_vocab_size, (1, args.text_len))
    params = SamplingParams(greedy=False, temperature=1.0, top_k=16)
    seconds: dict[str, float] = {}
    tokens: dict[str, np.ndarray] = {}
    with paddle.no_grad():
        for use_cache in (True, False):
            t0 = time.perf_counter()
            tokens[str(use_cache)] = generate_image_tokens(model, text, params, seed=1, use_cache=use_cache)
            seconds["cached" if use_cache else "recompute"] = time.perf_counter() - t0
    return {"benchmark": "kv_cache", "image_tokens": args.grid ** 2, "text_tokens": args.text_len,
            "model": f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, sparse_blockwise",
            "seconds": seconds, "speedup_cache_vs_recompute": seconds["recompute"] / seconds["cached"],
            "same_tokens": bool(np.array_equal(tokens["True"], tokens["False"]))}


def bench_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Training steps of configs/vilg/shapes.yaml's model on random tokens of its shapes."""
    import paddle

    from ernie_vilg.config import load_config
    from ernie_vilg.models.transformer import ErnieViLG, flops_per_token, stream_layout
    from ernie_vilg.runtime import configure_threads
    from ernie_vilg.training.trainer import build_optimizer

    threads = configure_threads(args.threads)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "vilg", "shapes.yaml"),
                      ["Model.text_vocab_size=700", "Model.image_vocab_size=512", f"Model.image_grid={args.grid}"])
    m = cfg.Model
    paddle.seed(0)
    model = ErnieViLG(m)
    optimizer = build_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    b = cfg.Data.batch_size
    text = paddle.to_tensor(rng.integers(5, m.text_vocab_size, (b, m.max_text_len)))
    image = paddle.to_tensor(rng.integers(0, m.image_vocab_size, (b, m.image_grid, m.image_grid)))

    def step() -> None:
        _bidirectional_loss(model, text, image).backward()
        optimizer.step()
        optimizer.clear_grad()

    step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_s = (time.perf_counter() - t0) / args.steps
    tokens_per_pair = sum(stream_layout(m, d).total for d in ("txt2img", "img2txt"))
    model_flops = flops_per_token(m) * tokens_per_pair * b / step_s
    # Paddle's own matmul rate at a size typical of the model's GEMMs, same process, same threads
    a = paddle.randn([1024, m.hidden_size * m.ffn_mult])
    w = paddle.randn([m.hidden_size * m.ffn_mult, m.hidden_size * m.ffn_mult])
    for _ in range(3):
        a @ w
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        (a @ w).numpy()
    mm_flops = reps * 2 * a.shape[0] * a.shape[1] * w.shape[1] / (time.perf_counter() - t0)
    return {"benchmark": "throughput", "config": "configs/vilg/shapes.yaml", "threads": threads,
            "batch": b, "step_seconds": step_s, "pairs_per_second": b / step_s,
            "tokens_per_second": b * tokens_per_pair / step_s, "model_gflops": model_flops / 1e9,
            "matmul_gflops": mm_flops / 1e9, "fraction_of_matmul_rate": model_flops / mm_flops}


def bench_mkl(args: argparse.Namespace) -> dict[str, Any]:
    """(c) in fresh processes with MKL's default code path (MKL_DEBUG_CPU_TYPE empty: MKL's own
    choice, which `ernie_vilg.runtime.mkl_avx2_on_amd` leaves alone) and with its AVX2 path (5),
    alternating over `--repeats` rounds. The ratio is what the package's import-time rule buys on
    an AMD CPU; on Intel CPUs the rule does not fire and this comparison does not apply."""
    runs: dict[str, list[dict[str, Any]]] = {"mkl_default": [], "mkl_avx2": []}
    for _ in range(args.repeats):
        for name, value in (("mkl_default", ""), ("mkl_avx2", "5")):
            cmd = [sys.executable, __file__, "throughput", "--grid", str(args.grid), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            env = dict(os.environ, MKL_DEBUG_CPU_TYPE=value)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary: dict[str, Any] = {"benchmark": "mkl", "config": "configs/vilg/shapes.yaml", "grid": args.grid,
                               "threads": runs["mkl_avx2"][0]["threads"], "batch": runs["mkl_avx2"][0]["batch"]}
    for name, rs in runs.items():
        summary[name] = {key: float(np.median([r[key] for r in rs])) for key in ("step_seconds", "matmul_gflops")}
    summary["step_speedup"] = summary["mkl_default"]["step_seconds"] / summary["mkl_avx2"]["step_seconds"]
    summary["matmul_speedup"] = summary["mkl_avx2"]["matmul_gflops"] / summary["mkl_default"]["matmul_gflops"]
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["attention", "kv_cache", "throughput", "mkl", "all", "_attention_worker"])
    p.add_argument("--impl", default="dense")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid", type=int, default=32, help="image grid side (32 -> 1024 image tokens)")
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--kernel", type=int, default=11)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--loss", choices=["separate", "both"], default="separate",
                   help="attention: one forward per direction, or both streams in one pass (the vilg stage)")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="attention, with --loss both: chunked head + cross-entropy, tokens per chunk (0 = off)")
    args = p.parse_args()
    if args.which == "_attention_worker":
        print(json.dumps(attention_worker(args)))
        return
    jobs = {"attention": bench_attention, "kv_cache": bench_kv_cache, "throughput": bench_throughput,
            "mkl": bench_mkl}
    for name, fn in jobs.items():
        if args.which in (name, "all"):
            print(json.dumps(fn(args)), flush=True)


if __name__ == "__main__":
    main()
