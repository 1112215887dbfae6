"""A peer: lucidrains' DALLE-pytorch trained on OUR token shards, at our model size, judged by OUR judge.

    # the peer's own venv (the project venv stays free of torch); youtokentome (a dalle-pytorch
    # dependency) needs Cython at build time; dalle_pytorch imports pkg_resources (gone from
    # setuptools 81); the torchvision that pip picks for torch 2.13 is a CUDA build that cannot load
    # next to the CPU torch, so it is removed (see "torchvision" below)
    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install torch==2.13.0 Cython setuptools wheel
    /tmp/peer-venv/bin/pip install --no-build-isolation youtokentome
    /tmp/peer-venv/bin/pip install torch==2.13.0 dalle-pytorch==1.6.6 "setuptools<81"
    /tmp/peer-venv/bin/pip uninstall -y torchvision

    # the run (from the repo root, with the PROJECT venv's python; it starts the peer venv's python
    # for the torch stage); pinned to core 1, one thread
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/peer_dalle.py \
        --data /tmp/q2 --minutes 12 --out /tmp/peer_dalle --best-of 8

Three stages, each its own process (two OpenMP runtimes, Paddle's and torch's, in one process spin
against each other):

1. `prepare` (project venv): reads the token shards with `TokenShards` and encodes every caption
   with our `TextTokenizer` ([CLS] .. [SEP], right-padded with [PAD] = 0 to 64 ids, which is what
   DALLE-pytorch takes as padding); writes OUT/data.npz.
2. `train` (peer venv, torch + dalle-pytorch): builds `DALLE(dim=128, depth=4, heads=4,
   dim_head=32, attn_types=('axial_row', 'axial_row', 'axial_col', 'conv_like'))` (our layer
   pattern: row, row, column, conv in the last layer), trains it on the image ids for `--minutes`
   of wall time with batch 16, one random paraphrase of the five per visit, AdamW lr 2e-3
   (betas 0.9 / 0.98, weight decay 0.01, clip 1.0), linear warm-up 30 steps and a cosine to 1e-4
   over the steps that fit in the budget (estimated from steps 5 to 25), text condition
   dropped for `--null-cond-prob` of the samples (ours: Train.cond_drop 0.1); then samples the
   image ids of every test caption with DALLE-pytorch's own `generate_images` (top-k 4 of the
   codebook, temperature 1; with `--cond-scale` != 1 its call sequence in `_guided_sample`, since
   its own guided path loses the text, see there), ranking `--best-of` N candidates by the model's own
   log-likelihood of the image tokens given the text (DALLE-pytorch has no image-to-text
   direction); writes OUT/peer_ids.npz and OUT/peer_train.json.
3. `judge` (project venv): decodes the ids with OUR image tokenizer (`decode_image_ids`) and
   judges them with OUR shapes judge against the test captions; prints and writes OUT/peer.json.

DALLE-pytorch needs a VAE object only for the grid and the image vocabulary: a `DiscreteVAE`
(never trained, never used for pixels) whose `decode` hands back the token ids, so that
`generate_images` returns the sampled ids. Its constructor asserts a power-of-two image size, so it
is built at 64 px with 3 layers and its `image_size` then set to 48 (48 / 2^3 = 6: a 6 x 6 grid).

torchvision: dalle_pytorch.vae imports taming.models.vqgan (for its VQGAN VAE, unused here), which
imports torchvision through taming.main and pytorch_lightning. When torchvision is absent or
cannot load, a placeholder `taming.models.vqgan` (two classes that raise when built) is
registered before the import; nothing used here touches it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEXT_LEN = 64
DEFAULT_PEER_PYTHON = "/tmp/peer-venv/bin/python"


# ----------------------------------------------------------------------------- stage 1: prepare

def prepare(data: Path, out: Path, num_test: int) -> dict[str, Any]:
    """Token shards + captions -> OUT/data.npz (project venv: our TokenShards and TextTokenizer)."""
    sys.path.insert(0, str(REPO))
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.text.tokenizer import TextTokenizer, pad_ids

    tok = TextTokenizer(data / "vocab.txt")
    if tok.pad_id != 0:
        raise ValueError(f"{data / 'vocab.txt'}: [PAD] is id {tok.pad_id}; DALLE-pytorch takes 0 as padding")
    train = TokenShards(data / "tokens" / "train")
    test = TokenShards(data / "tokens" / "test")
    if train.grid != test.grid or train.codebook_size != test.codebook_size:
        raise ValueError("train and test shards differ in grid or codebook size")
    n_train = len(train)
    train_ids = np.stack([train.ids(i) for i in range(n_train)]).reshape(n_train, -1)
    paraphrases: list[np.ndarray] = []
    for i in range(n_train):
        rec = train[i]
        texts = list(rec.texts) or [rec.text]
        texts = (texts * 5)[:5]  # five per record (ours has five; pad by repeating if fewer)
        paraphrases.append(pad_ids([tok.encode(t, TEXT_LEN) for t in texts], TEXT_LEN, tok.pad_id))
    test_n = min(num_test, len(test))
    test_text = pad_ids([tok.encode(test[i].text, TEXT_LEN) for i in range(test_n)], TEXT_LEN, tok.pad_id)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "data.npz", train_ids=train_ids.astype(np.int64), train_text=np.stack(paraphrases),
             test_text=test_text, grid=np.int64(train.grid), codebook=np.int64(train.codebook_size),
             vocab=np.int64(tok.vocab_size))
    return {"train": n_train, "test": test_n, "grid": train.grid, "codebook": train.codebook_size,
            "vocab": tok.vocab_size}


# ----------------------------------------------------------------------------- stage 2: train (torch)

def _import_dalle() -> Any:
    """dalle_pytorch, with a placeholder taming.models.vqgan when torchvision cannot load (module doc)."""
    try:
        import taming.models.vqgan  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        stub = types.ModuleType("taming.models.vqgan")

        class _Unavailable:  # the VQGAN VAE is never used by this benchmark
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise RuntimeError(f"taming's VQGAN is unavailable here ({exc})")

        stub.VQModel = _Unavailable  # type: ignore[attr-defined]
        stub.GumbelVQ = _Unavailable  # type: ignore[attr-defined]
        sys.modules["taming.models.vqgan"] = stub
        print(f"[peer] taming.models.vqgan replaced by a placeholder ({type(exc).__name__}: {exc})", flush=True)
    import dalle_pytorch

    return dalle_pytorch


def _lr_at(step: int, horizon: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up, then a cosine from lr to min_lr over `horizon` steps (min_lr after it)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))


def _guided_sample(model: Any, text: Any, thres: float, temperature: float, cond_scale: float) -> Any:
    """Image ids [B, n] with classifier-free guidance, by the call sequence of DALLE-pytorch's
    `generate_images` (its forward, `top_k`, `gumbel_sample`), without its cache. Needed because in
    1.6.6 `forward(null_cond_prob=1.)` zeroes the text in place, and `generate_images` passes a
    view of its running sequence: after the first token every pass, the conditional one too, sees
    no text (so `generate_images(cond_scale != 1)` samples unconditional images). Here each pass
    gets its own copy of the text."""
    import torch
    from dalle_pytorch.dalle_pytorch import gumbel_sample, top_k

    image = text.new_zeros((text.shape[0], 0))
    for _ in range(model.image_seq_len):
        cond = model(text.clone(), image)[:, -1]
        null = model(text.clone(), image, null_cond_prob=1.0)[:, -1]
        logits = null + (cond - null) * cond_scale
        sample = gumbel_sample(top_k(logits, thres=thres), temperature=temperature, dim=-1)
        image = torch.cat((image, (sample - model.num_text_tokens)[:, None]), dim=-1)
    return image


def train_and_sample(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dalle_pytorch = _import_dalle()
    from dalle_pytorch import DALLE, DiscreteVAE

    out = Path(args.out)
    data = np.load(out / "data.npz")
    train_ids = torch.from_numpy(data["train_ids"])
    train_text = torch.from_numpy(data["train_text"])
    test_text = torch.from_numpy(data["test_text"])
    grid, codebook, vocab = int(data["grid"]), int(data["codebook"]), int(data["vocab"])
    layers = int(round(math.log2(48 / grid))) if grid in (6, 12, 24) else None
    if layers is None:
        raise ValueError(f"grid {grid}: this benchmark is set up for the 48 px shapes world (grid 6)")

    class IdsOnlyVAE(DiscreteVAE):
        """Tells DALLE the grid and the image vocabulary; `decode` returns the ids unchanged."""

        def decode(self, img_seq: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return img_seq

    vae = IdsOnlyVAE(image_size=64, num_layers=layers, num_tokens=codebook, codebook_dim=16, hidden_dim=8)
    vae.image_size = 48  # power-of-two assert passed; DALLE reads image_size // 2**num_layers = grid
    attn_types = tuple(args.attn_types.split(","))
    model = DALLE(dim=128, vae=vae, num_text_tokens=vocab, text_seq_len=TEXT_LEN, depth=4, heads=4, dim_head=32,
                  attn_types=attn_types, attn_dropout=0.0, ff_dropout=0.0,
                  optimize_for_inference=args.optimize_for_inference,
                  rotary_emb=not args.no_rotary, shift_tokens=not args.no_shift_tokens,
                  loss_img_weight=args.loss_img_weight)
    if model.image_seq_len != grid * grid:
        raise RuntimeError(f"DALLE image_seq_len {model.image_seq_len} != {grid * grid}")
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae."))
    print(f"[peer] dalle-pytorch {dalle_pytorch.__version__}, torch {torch.__version__}, "
          f"{n_params / 1e6:.2f} M parameters (VAE excluded), attn_types {attn_types}", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    rng = np.random.default_rng(args.seed)
    n = len(train_ids)
    order = rng.permutation(n)
    cursor = 0
    budget = args.minutes * 60.0
    horizon = args.max_steps or 0
    step, losses = 0, []
    model.train()
    if args.load:
        model.load_state_dict(torch.load(args.load, map_location="cpu"))
        prev = json.loads((Path(args.load).parent / "peer_train.json").read_text())
        step, horizon = int(prev["steps"]), int(prev["cosine_horizon"])
        print(f"[peer] loaded {args.load} ({step} steps); sampling only", flush=True)
    t0 = time.perf_counter()
    while not args.load:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        if step == 5:
            t5 = elapsed
        if step == 25 and not args.max_steps:  # the first steps are slow (allocator warm-up): skip 5
            rate = (elapsed - t5) / 20
            horizon = max(step + 1, int(step + (budget - elapsed) / rate))
            print(f"[peer] {rate:.3f} s/step over steps 5-25: cosine horizon {horizon} steps", flush=True)
        if cursor + args.batch_size > n:
            order, cursor = rng.permutation(n), 0
        idx = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        pick = rng.integers(0, train_text.shape[1], size=len(idx))
        text = train_text[idx, pick].clone()
        image = train_ids[idx]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, horizon or 10 ** 9, args.lr, args.min_lr, args.warmup)
        loss = model(text, image, return_loss=True, null_cond_prob=args.null_cond_prob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            print(f"[peer] step {step} loss {np.mean(losses[-args.log_every:]):.4f} "
                  f"{(time.perf_counter() - t0) / step:.3f} s/step", flush=True)
    train_seconds = time.perf_counter() - t0 if not args.load else float(prev["train_seconds"])
    if not args.load:
        torch.save(model.state_dict(), out / "peer_model.pt")
    print(f"[peer] trained {step} steps in {train_seconds:.1f} s", flush=True)

    # sampling: DALLE-pytorch's own loop; top-k keeps int((1 - thres) * logits) of ALL logits
    # (text + image vocabularies; text logits are masked at image positions), so thres is set for
    # exactly `top_k` candidates
    total = model.total_tokens
    thres = 1.0 - (args.top_k + 0.5) / total
    assert max(int((1 - thres) * total), 1) == args.top_k
    model.eval()
    t1 = time.perf_counter()
    n_best = max(1, args.best_of)
    single, best, all_loglik = [], [], []
    with torch.no_grad():
        per_batch = max(1, args.sample_batch // n_best)
        for start in range(0, len(test_text), per_batch):
            text = test_text[start:start + per_batch]
            rep = text.repeat_interleave(n_best, dim=0)
            if args.cond_scale == 1.0:
                ids = model.generate_images(rep.clone(), filter_thres=thres, temperature=args.temperature,
                                            use_cache=args.use_cache)
            else:
                ids = _guided_sample(model, rep, thres, args.temperature, args.cond_scale)
            ids = ids.reshape(len(text), n_best, -1)
            single.append(ids[:, 0])
            if n_best > 1:
                logits = model(rep.clone(), ids.reshape(len(rep), -1))
                img_logits = logits[:, TEXT_LEN:].float().log_softmax(-1)
                target = ids.reshape(len(rep), -1) + model.num_text_tokens
                ll = img_logits.gather(-1, target[..., None])[..., 0].sum(-1).reshape(len(text), n_best)
                all_loglik.append(ll)
                best.append(ids[torch.arange(len(text)), ll.argmax(1)])
            print(f"[peer] sampled {min(start + per_batch, len(test_text))}/{len(test_text)} captions "
                  f"x{n_best} ({time.perf_counter() - t1:.0f} s)", flush=True)
    sample_seconds = time.perf_counter() - t1
    arrays = {"single": torch.cat(single).reshape(-1, grid, grid).numpy()}
    if best:
        arrays["best"] = torch.cat(best).reshape(-1, grid, grid).numpy()
        arrays["loglik"] = torch.cat(all_loglik).numpy()
    np.savez(out / "peer_ids.npz", **arrays)
    info = {
        "peer": "dalle-pytorch", "dalle_pytorch_version": dalle_pytorch.__version__,
        "torch_version": torch.__version__, "threads": args.threads, "params_M": round(n_params / 1e6, 3),
        "attn_types": list(attn_types), "optimize_for_inference": args.optimize_for_inference,
        "rotary_emb": not args.no_rotary, "shift_tokens": not args.no_shift_tokens, "loss_img_weight": args.loss_img_weight,
        "dim": 128, "depth": 4, "heads": 4, "dim_head": 32, "batch_size": args.batch_size, "lr": args.lr,
        "min_lr": args.min_lr, "warmup": args.warmup, "cosine_horizon": horizon,
        "null_cond_prob": args.null_cond_prob, "cond_scale": args.cond_scale, "top_k": args.top_k,
        "filter_thres": thres, "temperature": args.temperature, "use_cache": args.use_cache,
        "best_of": n_best, "steps": step, "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, step), 4),
        "final_loss_mean_last_100": (round(float(np.mean(losses[-100:])), 4) if losses
                                     else (prev.get("final_loss_mean_last_100") if args.load else None)),
        "sample_seconds": round(sample_seconds, 1),
    }
    (out / "peer_train.json").write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------- stage 3: judge

def judge(data: Path, out: Path, ckpt: Path) -> dict[str, Any]:
    """Decode the peer's ids with OUR tokenizer, judge with OUR shapes judge (project venv)."""
    sys.path.insert(0, str(REPO))
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.generation.evaluate import _judge
    from ernie_vilg.generation.pipelines import decode_image_ids
    from ernie_vilg.vq.registry import load_tokenizer

    ids = np.load(out / "peer_ids.npz")
    tokenizer = load_tokenizer(ckpt)
    shards = TokenShards(data / "tokens" / "test")
    result: dict[str, Any] = json.loads((out / "peer_train.json").read_text())
    for key, prefix in (("single", "judge_"), ("best", f"judge_best_of_{result['best_of']}_")):
        if key not in ids:
            continue
        grids = ids[key]
        records = [shards[i] for i in range(len(grids))]
        images = decode_image_ids(tokenizer, grids)
        metrics, rows = _judge(images, records)
        result.update({k.replace("judge_", prefix, 1): round(v, 4) for k, v in metrics.items()})
        with (out / f"judgements_{key}.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        if key == "single":
            from ernie_vilg.generation.pipelines import save_grid

            save_grid(images[:64], out / "grid.png", min_cell=128)
    result["num_test"] = int(len(ids["single"]))
    return result


# ----------------------------------------------------------------------------- driver

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Stages: prepare and judge run in this (project) python, train in --peer-python.")
    p.add_argument("--data", type=Path, default=Path("/tmp/q2"),
                   help="folder with tokens/{train,test}, vocab.txt and vq/checkpoints/ (default /tmp/q2)")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="image tokenizer checkpoint (default: the newest DATA/vq/checkpoints/step-*)")
    p.add_argument("--out", type=Path, default=Path("/tmp/peer_dalle"), help="output folder")
    p.add_argument("--minutes", type=float, default=12.0, help="training wall-clock budget (default 12)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--null-cond-prob", type=float, default=0.1,
                   help="text condition dropped for this share of samples (ours: Train.cond_drop 0.1)")
    p.add_argument("--cond-scale", type=float, default=1.0,
                   help="classifier-free guidance scale at sampling (1: none, DALLE-pytorch's generate_images; "
                        "otherwise _guided_sample, see its doc)")
    # ablations of DALLE-pytorch's own additions (defaults: the library's defaults), to find which of
    # them makes it learn attribute binding faster than ours (docs/benchmarks.md, "Peer ablations")
    p.add_argument("--no-rotary", action="store_true", help="DALLE(rotary_emb=False): learned absolute positions")
    p.add_argument("--no-shift-tokens", action="store_true", help="DALLE(shift_tokens=False)")
    p.add_argument("--loss-img-weight", type=float, default=7.0, help="DALLE(loss_img_weight=...) (default 7)")
    p.add_argument("--attn-types", default="axial_row,axial_row,axial_col,conv_like",
                   help="comma-separated DALLE attn_types, cycled over the 4 layers")
    p.add_argument("--optimize-for-inference", action="store_true",
                   help="DALLE optimize_for_inference: axial attention as masked full attention (cacheable)")
    p.add_argument("--use-cache", action="store_true", help="generate_images(use_cache=True)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--best-of", type=int, default=1, help="candidates per caption (>1: also best-of-N)")
    p.add_argument("--num-test", type=int, default=200, help="test captions (default 200)")
    p.add_argument("--sample-batch", type=int, default=128, help="sequences sampled together")
    p.add_argument("--load", default=None,
                   help="OUT_OF_A_RUN/peer_model.pt: skip training, sample from it (its peer_train.json beside)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                   help=f"python of the venv with torch and dalle-pytorch (default {DEFAULT_PEER_PYTHON})")
    p.add_argument("--stage", choices=("all", "prepare", "train", "judge"), default="all",
                   help="run one stage only (train must run in the peer venv)")
    args = p.parse_args(argv)

    if args.stage == "train":
        info = train_and_sample(args)
        print(json.dumps(info), flush=True)
        return 0
    if not (args.data / "tokens" / "test" / "info.json").is_file():
        p.error(f"{args.data}/tokens/test/info.json not found (token shards not ready?)")
    ckpt = args.ckpt
    if ckpt is None:
        found = sorted((args.data / "vq" / "checkpoints").glob("step-*"))
        if not found:
            p.error(f"no checkpoint under {args.data}/vq/checkpoints; pass --ckpt")
        ckpt = found[-1]
    wall0 = time.perf_counter()
    if args.stage in ("all", "prepare"):
        print(f"[prepare] {json.dumps(prepare(args.data, args.out, args.num_test))}", flush=True)
    if args.stage == "all":
        if not Path(args.peer_python).is_file():
            p.error(f"--peer-python {args.peer_python}: not found (install the peer venv: see the module doc)")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = [args.peer_python, str(Path(__file__).resolve()), *forwarded, "--stage", "train"]
        subprocess.run(cmd, env=env, check=True)
    if args.stage in ("all", "judge"):
        result = judge(args.data, args.out, ckpt)
        result["wall_seconds"] = round(time.perf_counter() - wall0, 1)
        result["tokenizer_ckpt"] = str(ckpt)
        (args.out / "peer.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        keys = ("judge_shape", "judge_colour", "judge_position", "judge_size", "judge_count", "judge_all")
        print(json.dumps(result, ensure_ascii=False))
        print("| sampling | " + " | ".join(k[6:] for k in keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        print("| single | " + " | ".join(f"{result[k]:.3f}" for k in keys) + " |")
        best = f"judge_best_of_{result['best_of']}_"
        if best + "shape" in result:
            print(f"| best of {result['best_of']} (own image log-lik.) | "
                  + " | ".join(f"{result[best + k[6:]]:.3f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
