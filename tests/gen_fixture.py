"""A complete, untrained vilg checkpoint folder in seconds: vocab.txt, vilg.json, image_tokenizer/
(a tiny VQVAE at 16 px -> 4 x 4 tokens) and the model, written by the real checkpoint code, so every
loader (load_bundle, the pipeline, the tools) reads it as it reads a trained one."""
from __future__ import annotations

import json
from pathlib import Path

import paddle

from ernie_vilg.config import load_config
from ernie_vilg.checkpoint_io import save_checkpoint
from vilg_fixture import CHARS, SPECIAL

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def write_tiny_checkpoint(root: Path, seed: int = 0, *overrides: str) -> Path:
    """Return the checkpoint folder (root/vilg/checkpoints/step-00000001)."""
    from ernie_vilg.checkpoint_io import copy_loadable
    from ernie_vilg.models.transformer import ErnieViLG
    from ernie_vilg.vq.registry import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + list(CHARS)) + "\n", encoding="utf-8")
    paddle.seed(seed)
    vq_cfg = load_config(REPO / "configs/vq/tiny_vqvae.yaml", [f"Data.image_size={SIZE}"])
    tok = build_tokenizer(vq_cfg.VQ)
    vq_ckpt = save_checkpoint(root / "vq", 1, vq_cfg, tok.state_dict())
    grid = tok.grid_size(SIZE)
    cfg = load_config(REPO / "configs/vilg/tiny.yaml", [
        f"Data.image_size={SIZE}", "Data.max_text_len=12", "Model.max_text_len=12",
        f"Data.vocab_file={vocab}", f"Data.tokenizer_ckpt={vq_ckpt}",
        f"Model.text_vocab_size={len(SPECIAL) + len(CHARS)}", f"Model.image_vocab_size={vq_cfg.VQ.codebook_size}",
        f"Model.image_grid={grid}", "Generation.top_k=8", "Generation.max_text_len=8", *overrides])
    model = ErnieViLG(cfg.Model)

    def extras(folder: Path) -> None:  # as VilgTrainModule.save_extras lays them out
        (folder / "vocab.txt").write_text(vocab.read_text(encoding="utf-8"), encoding="utf-8")
        copy_loadable(vq_ckpt, folder / "image_tokenizer")
        (folder / "vilg.json").write_text(json.dumps({"vocab": "vocab.txt", "image_tokenizer": "image_tokenizer"}),
                                          encoding="utf-8")

    return save_checkpoint(root / "vilg" / "checkpoints", 1, cfg, model.state_dict(), extras=extras)
