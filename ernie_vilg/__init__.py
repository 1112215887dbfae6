"""ERNIE-ViLG: unified generative pre-training for bidirectional vision-language generation (PaddlePaddle)."""
__version__ = "0.1.0"
