"""Stage 1: image tokenizers (VQVAE, VQGAN, dVAE) behind one interface.

Stage 2 uses only `ImageTokenizer` (`encode_to_ids`, `decode_ids`, `embed_ids`,
`decode_embeddings`, `codebook_size`, `grid_size`), obtained from `build_tokenizer(cfg.VQ)` or,
trained and frozen, from `load_tokenizer(ckpt_dir)` (`vq.registry`).
"""
from ernie_vilg.vq.base import ImageTokenizer
from ernie_vilg.vq.quantizer import QuantizerInfo, QuantizerOutput, VectorQuantizer
from ernie_vilg.vq.registry import TOKENIZERS, build_tokenizer, load_tokenizer
from ernie_vilg.vq.vqvae import VQVAE, VQVAEOutput

__all__ = [
    "TOKENIZERS", "ImageTokenizer", "QuantizerInfo", "QuantizerOutput", "VQVAE", "VQVAEOutput",
    "VectorQuantizer", "build_tokenizer", "load_tokenizer",
]
