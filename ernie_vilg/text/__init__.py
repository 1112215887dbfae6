"""Text side: WordPiece tokenizer over a local vocab.txt and the vocab builder."""
from ernie_vilg.text.tokenizer import SPECIAL_TOKENS, TextTokenizer
from ernie_vilg.text.vocab import build_vocab

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "build_vocab"]
