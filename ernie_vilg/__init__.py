"""ERNIE-ViLG: unified generative pre-training for bidirectional vision-language generation (PaddlePaddle)."""
from ernie_vilg.runtime import contiguous_views_on_cpu, keep_freed_memory, mkl_avx2_on_amd, quiet_library_notices

__version__ = "0.1.0"

# Before anything imports paddle: Paddle's MKL picks slow kernels on AMD CPUs (runtime.py).
mkl_avx2_on_amd()
# ... and its stride kernels copy views slowly on CPU (runtime.py).
contiguous_views_on_cpu()
# ... and large activations would be fresh zeroed pages at every step (runtime.py).
keep_freed_memory()
# ... and its import-time notices (no ccache; setuptools' distutils shim, via paddlenlp) would turn
# a tool's one-line error into five lines on stderr (runtime.py).
quiet_library_notices()


def __getattr__(name: str):  # PEP 562: `from ernie_vilg import ErnieViLGPipeline` without
    # importing Paddle at `import ernie_vilg` (the settings above must run before Paddle loads)
    if name == "ErnieViLGPipeline":
        from ernie_vilg.pipeline import ErnieViLGPipeline

        return ErnieViLGPipeline
    raise AttributeError(f"module 'ernie_vilg' has no attribute {name!r}")


__all__ = ["ErnieViLGPipeline", "__version__"]
