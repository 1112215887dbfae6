"""Convert weights in and out of the project: `python tools/convert_checkpoint.py SUBCOMMAND ...`.

    to-safetensors   --ckpt DIR --out FILE.safetensors|DIR   weights of a checkpoint -> safetensors
    from-safetensors --in FILE|DIR [--config C] --out DIR     safetensors -> a checkpoint folder
    to-pretrained    --ckpt DIR --out DIR [--safetensors] [--dtype D]
                                                               vilg checkpoint -> pretrained folder (PaddleNLP
                                                               layout; ErnieViLGPipeline.from_pretrained, --ckpt)
    inspect          --in FILE                                 tensors of a .safetensors / .pt / .pdparams
    taming           --in model.ckpt --out DIR [--lpips-out DIR] [--image-size N]
                                                               taming-transformers VQGAN -> tokenizer checkpoint
    dalle            --encoder encoder.pkl --decoder decoder.pkl --out DIR [--image-size N]
                                                               OpenAI DALL-E dVAE -> tokenizer checkpoint

Each subcommand is one function of `ernie_vilg.convert`; add a converter by adding one entry to
SUBCOMMANDS. Pickled inputs are read only through the restricted unpicklers. A bad input prints
one line naming the file or key and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Callable, Optional


def _to_safetensors(args: argparse.Namespace) -> int:
    from ernie_vilg.convert.safetensors_io import checkpoint_to_safetensors

    print(checkpoint_to_safetensors(args.ckpt, args.out))
    return 0


def _from_safetensors(args: argparse.Namespace) -> int:
    from ernie_vilg.convert.safetensors_io import checkpoint_from_safetensors

    print(checkpoint_from_safetensors(args.input, args.out, args.config))
    return 0


def _to_pretrained(args: argparse.Namespace) -> int:
    from ernie_vilg.generation.pipelines import save_pretrained
    from ernie_vilg.pipeline import load_bundle

    print(save_pretrained(load_bundle(args.ckpt, need_image_tokenizer=True), args.out, args.safetensors, args.dtype))
    return 0


def _args_pretrained(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="vilg checkpoint folder (or its run folder: the newest checkpoint)")
    p.add_argument("--out", required=True, help="pretrained folder to write (replaced if it exists)")
    p.add_argument("--safetensors", action="store_true", help="weights as model.safetensors (default model_state.pdparams)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast floating-point weights (loaders cast them back to the device's dtype)")


def _inspect(args: argparse.Namespace) -> int:
    from ernie_vilg.convert.safetensors_io import describe_file

    for row in describe_file(args.input):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _args_to(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or a run folder: its newest checkpoint)")
    p.add_argument("--out", required=True, help="FILE.safetensors (weights only) or a folder")


def _args_from(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="input", required=True, help="a .safetensors file or a folder from to-safetensors")
    p.add_argument("--config", default=None, help="config YAML (default: the one stored with the weights)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")


def _args_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="input", required=True, help="a .safetensors, PyTorch zip or Paddle weight file")


def _taming(args: argparse.Namespace) -> int:
    from ernie_vilg.convert.taming import convert_taming

    print(convert_taming(args.input, args.out, args.lpips_out, args.image_size))
    return 0


def _args_taming(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="input", required=True, help="taming-transformers model.ckpt (f8-8192 / f16-16384)")
    p.add_argument("--out", required=True, help="tokenizer checkpoint folder to write")
    p.add_argument("--lpips-out", default=None, help="also write the LPIPS/VGG16 weights (VQGAN.lpips_weights)")
    p.add_argument("--image-size", type=int, default=256)


def _dalle(args: argparse.Namespace) -> int:
    from ernie_vilg.convert.dalle import convert_dalle

    print(convert_dalle(args.encoder, args.decoder, args.out, args.image_size))
    return 0


def _args_dalle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="OpenAI DALL-E encoder.pkl")
    p.add_argument("--decoder", required=True, help="OpenAI DALL-E decoder.pkl")
    p.add_argument("--out", required=True, help="tokenizer checkpoint folder to write")
    p.add_argument("--image-size", type=int, default=256)


# name -> (help, add arguments, run). Converters of other formats (VQGAN, dVAE, FID) add rows here.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "to-safetensors": ("export a checkpoint's weights as safetensors", _args_to, _to_safetensors),
    "from-safetensors": ("build a checkpoint folder from safetensors weights", _args_from, _from_safetensors),
    "to-pretrained": ("vilg checkpoint -> pretrained folder (config.json, weights, tokenizers)", _args_pretrained,
                      _to_pretrained),
    "inspect": ("list the tensors of a weight file", _args_inspect, _inspect),
    "taming": ("taming-transformers VQGAN model.ckpt -> tokenizer checkpoint", _args_taming, _taming),
    "dalle": ("OpenAI DALL-E dVAE encoder.pkl + decoder.pkl -> tokenizer checkpoint", _args_dalle, _dalle),
}


def _known_errors() -> tuple[type[BaseException], ...]:
    """User errors: one line, exit code 2. CheckpointError joins once its module (paddle) is loaded."""
    from ernie_vilg.config import ConfigError
    from ernie_vilg.safetensors_file import SafetensorsError
    from ernie_vilg.convert.torch_pickle import CheckpointFormatError
    from ernie_vilg.safe_pickle import UnreadablePickleError, UnsafePickleError

    known: list[type[BaseException]] = [ConfigError, SafetensorsError, CheckpointFormatError, UnsafePickleError,
                                        UnreadablePickleError,
                                        FileNotFoundError, IsADirectoryError]
    ckpt = sys.modules.get("ernie_vilg.checkpoint_io")
    if ckpt is not None:
        known.append(ckpt.CheckpointError)
    return tuple(known)


def _quiet_imports() -> None:
    """Import-time notices of Paddle / setuptools would break the one-line error contract."""
    warnings.filterwarnings("ignore", message=".*ccache.*")
    warnings.filterwarnings("ignore", message=".*Setuptools is replacing distutils.*")


def main(argv: Optional[list[str]] = None) -> int:
    _quiet_imports()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return SUBCOMMANDS[args.command][2](args)
    except Exception as exc:
        if isinstance(exc, _known_errors()):
            print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always one line
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
