"""A tiny token-shard dataset for the bidirectional model (no image tokenizer needed).

Every caption has the same number of characters, so a batch's text loss (a mean over non-pad
tokens) equals the mean of its equal halves: runs that split a global batch differently agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ernie_vilg.data.token_shards import TokenShardWriter

CHARS = "红绿蓝黄圆方三角大小上下左右的一个在"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_vilg_data(root: Path, items: int = 32, grid: int = 4, codebook: int = 32) -> list[str]:
    """Write vocab.txt and train shards under `root`; return the -o overrides that use them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(SPECIAL + list(CHARS)) + "\n", encoding="utf-8")
    rng = np.random.default_rng(0)
    writer = TokenShardWriter(root / "train", grid, codebook, shard_size=16)
    for i in range(items):
        text = "".join(rng.choice(list(CHARS), size=6))
        writer.add(rng.integers(0, codebook, size=(grid, grid)), text, [text], {"image": f"{i}.png"})
    writer.close()
    return [f"Data.vocab_file={root / 'vocab.txt'}", f"Data.train_shards={root / 'train'}",
            "Data.val_shards=", "Data.max_text_len=16", "Model.max_text_len=16"]
