"""ernie-vilg: PaddlePaddle reproduction of ERNIE-ViLG (bidirectional vision-language generation).

Install (CPU):  pip install -c constraints.txt -e ".[cpu]"
Install (GPU):  install the paddlepaddle-gpu build that matches your CUDA driver first (see
                README, "Clusters"), then pip install -c constraints.txt -e ".[gpu]"
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="ernie-vilg",
    version="0.1.0",
    description="Unified generative pre-training for bidirectional vision-language generation (PaddlePaddle)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ernie_vilg", "ernie_vilg.*"]),
    include_package_data=True,
    install_requires=[
        "paddlenlp==2.8.1",
        "numpy<2",
        "pillow",
        # the server build of OpenCV: same cv2 API, no libGL / GUI libraries needed on clusters
        "opencv-python-headless",
        "scipy",
        "pyyaml",
        "tqdm",
        "jieba",  # word-level caption metrics (AIC-ICC scorer) and the data filter
        "pycocoevalcap",  # the field's reference BLEU / METEOR / ROUGE-L / CIDEr-D scorers
        "safetensors",  # safe weight export / import
    ],
    extras_require={
        "cpu": ["paddlepaddle>=3.3.0,<3.4"],
        # PyPI's paddlepaddle-gpu lags behind; clusters install the CUDA build from Paddle's
        # own package index first (README, "Clusters"), which satisfies this requirement.
        "gpu": ["paddlepaddle-gpu>=3.3.0,<3.4"],
        "test": ["pytest>=7"],
        # tools/demo.py (gradio) and its browser test (selenium drives the system's chromium);
        # versions pinned in constraints.txt: the newest that install beside paddlenlp's pins
        "demo": ["gradio>=5,<6", "selenium>=4.20"],
    },
)
