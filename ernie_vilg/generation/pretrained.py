"""The pretrained folder: a vilg checkpoint in PaddleNLP's layout, for users of the model.

    config.json               model_type "ernie_vilg", the Model section flat (as PaddleNLP
                              configs are), dtype, and every other section under "ernie_vilg"
    model_state.pdparams      weights (Paddle pickle), or model.safetensors (--safetensors)
    generation_config.json    the Generation section (sampling, beam, guidance defaults)
    vocab.txt, tokenizer_config.json, special_tokens_map.json
                              the text tokenizer, saved by paddlenlp's save_pretrained, so
                              paddlenlp.transformers.AutoTokenizer.from_pretrained(DIR) works
    image_tokenizer/          the VQ tokenizer: a checkpoint folder (its weights, config.yaml,
                              meta.json) that vq.registry.load_tokenizer reads

Written by `tools/convert_checkpoint.py to-pretrained` (pipelines.save_pretrained); read by `load_bundle` (hence by every tool
that takes --ckpt) and by `ErnieViLGPipeline.from_pretrained`. Weights may be float32, float16 or
bfloat16; they are cast to the model's dtype on load (checkpoint_io.cast_to_model_dtypes).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import paddle

from ernie_vilg.config import Config, ConfigError, config_from_dict

MODEL_TYPE = "ernie_vilg"
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
WEIGHTS_PDPARAMS = "model_state.pdparams"
WEIGHTS_SAFETENSORS = "model.safetensors"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
DTYPES = ("float32", "float16", "bfloat16")


def is_pretrained_dir(path: str | Path) -> bool:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def write_pretrained(bundle: Any, image_tokenizer_dir: Path, out: str | Path, safetensors: bool = False,
                     dtype: Optional[str] = None) -> Path:
    """Write the pretrained folder of a loaded vilg checkpoint (`pipelines.VilgBundle`; its image
    tokenizer checkpoint at `image_tokenizer_dir`) to `out` (replaced if it exists; written under a
    temporary name and renamed). `pipelines.save_pretrained` is the entry point from a folder."""
    from ernie_vilg.checkpoint_io import CheckpointError, copy_loadable

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.resolve() == bundle.ckpt_dir.resolve():
        raise CheckpointError(f"{out}: the output folder must differ from the checkpoint")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = bundle.cfg  # with the vocab / codebook / grid sizes filled in by load_bundle
    state = bundle.model.state_dict()
    if dtype:
        state = {k: v.astype(dtype) if paddle.is_floating_point(v) else v for k, v in state.items()}
    weight_dtype = dtype or "float32"
    if safetensors:
        from ernie_vilg.safetensors_file import save_safetensors

        save_safetensors(state, tmp / WEIGHTS_SAFETENSORS, {"format": "pd", "model_type": MODEL_TYPE})
    else:
        paddle.save(state, str(tmp / WEIGHTS_PDPARAMS))
    data = cfg.to_dict()
    info = {"model_type": MODEL_TYPE, "architectures": ["ErnieViLG"], "dtype": weight_dtype,
            **data["Model"], "ernie_vilg": {k: v for k, v in data.items() if k not in ("Model", "Generation")},
            "source_checkpoint": str(bundle.ckpt_dir)}
    (tmp / CONFIG_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8")
    (tmp / GENERATION_FILE).write_text(json.dumps(data["Generation"], ensure_ascii=False, indent=1),
                                       encoding="utf-8")
    bundle.text_tokenizer.save_pretrained(tmp)
    tok_src = Path(image_tokenizer_dir)
    copy_loadable(tok_src, tmp / IMAGE_TOKENIZER_DIR)  # what load_tokenizer needs
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_pretrained_config(path: str | Path) -> Config:
    """The Config of a pretrained folder (config.json + generation_config.json)."""
    path = Path(path)
    try:
        info = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        generation = json.loads((path / GENERATION_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: pretrained folder without {Path(exc.filename).name}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: unreadable JSON ({exc})") from None
    from ernie_vilg.config import ModelConfig

    sections = dict(info.get("ernie_vilg", {}))
    model_keys = {f for f in ModelConfig.__dataclass_fields__}
    sections["Model"] = {k: v for k, v in info.items() if k in model_keys}
    sections["Generation"] = generation
    return config_from_dict(sections, str(path / CONFIG_FILE))


def load_pretrained_weights(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    from ernie_vilg.checkpoint_io import CheckpointError

    if (path / WEIGHTS_SAFETENSORS).is_file():
        from ernie_vilg.safetensors_file import load_safetensors

        return load_safetensors(path / WEIGHTS_SAFETENSORS)[0]
    if (path / WEIGHTS_PDPARAMS).is_file():
        from ernie_vilg.safe_pickle import safe_load

        try:
            return safe_load(path / WEIGHTS_PDPARAMS)
        except Exception as exc:  # paddle raises assorted types for truncated files
            raise CheckpointError(f"{path / WEIGHTS_PDPARAMS}: cannot load ({type(exc).__name__}: {exc})") from None
    raise CheckpointError(f"{path}: pretrained folder without {WEIGHTS_PDPARAMS} or {WEIGHTS_SAFETENSORS}")
