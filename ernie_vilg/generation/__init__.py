"""Generation in both directions: KV cache, logit filters, greedy / sampling / beam search loops,
and the checkpoint pipelines behind tools/generate.py and tools/caption.py."""
from ernie_vilg.models.kv_cache import KVCache, LayerKV
from ernie_vilg.generation.decoding import (
    SamplingParams,
    TextSpecials,
    beam_search_answer_tokens,
    beam_search_text_tokens,
    generate_answer_tokens,
    generate_image_tokens,
    generate_text_tokens,
)
from ernie_vilg.generation.filters import apply_temperature, top_k_filter, top_p_filter

__all__ = [
    "KVCache", "LayerKV", "SamplingParams", "TextSpecials", "apply_temperature", "beam_search_answer_tokens",
    "beam_search_text_tokens", "generate_answer_tokens", "generate_image_tokens", "generate_text_tokens", "top_k_filter", "top_p_filter",
]
