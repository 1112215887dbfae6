"""ERNIE-ViLG: unified generative pre-training for bidirectional vision-language generation (PaddlePaddle)."""
from ernie_vilg.runtime import mkl_avx2_on_amd

__version__ = "0.1.0"

# Before anything imports paddle: Paddle's MKL picks slow kernels on AMD CPUs (runtime.py).
mkl_avx2_on_amd()
