"""Typed configuration: YAML files with `_base_` inheritance, loaded into dataclasses.

YAML carries values; the dataclasses below carry types and defaults. Every section and key is
checked: an unknown section or key, or a value of the wrong type, raises `ConfigError` with a
one-line message that names the key and the file. Command-line overrides use
`-o Section.key=value`; values are parsed with `ast.literal_eval` (never `eval`) and then
type-checked like YAML values.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; tools print its message and exit with code 2."""


# reprlib with tight limits: a value quoted in an error message stays short even when a YAML
# alias bomb expands to billions of items (printing the whole value once wrote ~2 GB to stderr)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40
MAX_QUOTED = 120


def _short_name(name: Any) -> str:
    """A key as written (no quotes) unless it is long or not a string."""
    return name if isinstance(name, str) and len(name) <= 60 else short_repr(name, 60)


def short_repr(value: Any, limit: int = MAX_QUOTED) -> str:
    """repr(value) cut to at most `limit` characters, for error messages about outside input."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class GlobalConfig:
    stage: str = "vq"  # which training stage tools/train.py runs: "vq" | "vilg"
    seed: int = 0
    output_dir: str = "output/run"
    device: str = "cpu"  # "cpu" | "gpu"
    # CPU threads for Paddle's kernels (0 = all cores of this machine). Paddle uses one
    # thread unless told, so the tools set this before the first op.
    num_threads: int = 0


@dataclass
class DataConfig:
    train_manifest: str = ""
    val_manifest: str = ""
    test_manifest: str = ""
    image_size: int = 64  # center crop + resize to this square size
    batch_size: int = 16
    # tokenizer stages (vq, vqgan, dvae): processes that decode each batch's images
    # (data/image_workers.py); 0 = in the training process. Same batches either way
    num_workers: int = 0
    # token shards written by tools/tokenize_images.py (for the transformer stages)
    train_shards: str = ""
    val_shards: str = ""
    max_text_len: int = 32
    vocab_file: str = ""  # WordPiece vocab.txt (built by tools/build_vocab.py)
    tokenizer_ckpt: str = ""  # checkpoint folder of the image tokenizer
    # vilg training batches stream from token shards (stages/vilg.py StreamBatches): the rows
    # form this many fixed partitions, so W ranks (W dividing it) consume the rows of one process
    stream_partitions: int = 4
    shuffle_buffer: int = 1024  # rows in each partition's shuffle buffer (memory: owned partitions x this)


@dataclass
class VQConfig:
    kind: str = "vqvae"  # registry name: "vqvae" (VQGAN / dVAE arrive with their issue)
    in_channels: int = 3
    hidden_channels: int = 64
    # channel multiplier per resolution level; len(channel_mult) - 1 must equal log2(f)
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 1
    downsample_factor: int = 8  # f: 4 / 8 / 16
    # space-to-depth stem / pixel-shuffle head: the encoder starts on patch_size x patch_size
    # pixel patches and the decoder ends with a pixel shuffle, so no layer runs at full
    # resolution (much cheaper on CPU). 1 = off; then len(channel_mult) - 1 = log2(f / patch_size)
    patch_size: int = 1
    codebook_size: int = 8192
    embed_dim: int = 64
    beta: float = 0.25  # commitment weight (Eq. 1 uses 1.0; VQ-VAE paper recommends 0.25)
    use_ema: bool = False  # EMA codebook updates instead of the codebook loss term
    ema_decay: float = 0.99
    # codes unused for this many steps are restarted from random encoder outputs (0 = never)
    dead_code_steps: int = 100
    l2_normalize: bool = False  # cosine-similarity lookup (helps codebook usage)
    # dVAE only (kind "dvae"; not DALL-E, off by default so DALL-E's weights convert 1:1):
    # "instance" puts a per-channel GroupNorm (= instance norm) before the encoder's logits conv,
    # and the logits conv's init std is multiplied by dvae_logits_init_scale (docs/tokenizers.md)
    dvae_logits_norm: str = "none"  # "none" (DALL-E) | "instance" | "center" (dvae.py CenterNorm)
    dvae_logits_init_scale: float = 1.0


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # "constant" | "cosine"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip (0 = off)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_minutes: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    log_every: int = 20
    eval_every: int = 200
    save_every: int = 500
    keep_last: int = 2
    eval_samples: int = 64  # images / texts used by periodic validation
    resume: bool = True  # continue from the newest checkpoint in output_dir if present
    # resume from a checkpoint without optimizer.pdopt / trainer_state.pd (e.g. a merged
    # weights-only folder): the optimizer starts fresh; without this such a resume is refused
    resume_weights_only: bool = False
    progress_bar: bool = True
    # stop the job after this many consecutive steps with a non-finite loss or gradient
    max_consecutive_skips: int = 5
    # classifier-free guidance (models/guidance.py, docs/guidance.md): each sample's condition is
    # replaced by a null one with this probability, per direction (vilg stage; 0 = never)
    cond_drop: float = 0.0
    # weight of each direction's term in the vilg loss (models/losses.py). The paper's objective,
    # L = L_txt2img + L_img2txt (Eq. 3), is 1 and 1; other values are an option, not the paper
    txt2img_weight: float = 1.0
    img2txt_weight: float = 1.0
    # > 0: the vilg loss runs the tied output heads + cross-entropy this many target tokens at a
    # time (models/chunked_ce.py), so the [tokens, vocab] logits and their gradient never exist
    # whole; same loss and gradients. 0 = plain logits
    loss_chunk_tokens: int = 0


@dataclass
class ModelConfig:
    """The bidirectional ERNIE-ViLG transformer (`ernie_vilg.models`): pre-LN blocks shared by
    text-to-image and image-to-text; sparse image attention as in DALL-E (row / column / conv)."""

    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.0
    attention_impl: str = "sparse_blockwise"  # "dense" | "sparse_reference" | "sparse_blockwise"
    conv_kernel: int = 11  # convolutional attention kernel (last layer; odd)
    # image-to-text with a question prefix (VQA): image tokens also see the question (sparse_masks.py)
    image_sees_prefix: bool = False
    gelu_approximate: bool = False  # False = exact erf GELU, True = tanh approximation
    # additive value for masked scores: finite and fp16-safe (-inf gives NaN rows in fp16)
    mask_fill_value: float = -1.0e4
    text_vocab_size: int = 0  # 0 = from the vocab file
    image_vocab_size: int = 0  # 0 = from the tokenizer checkpoint
    max_text_len: int = 32
    image_grid: int = 0  # h = w of the image token grid (0 = from the tokenizer)
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    # recipe options measured against DALLE-pytorch's defaults (docs/benchmarks.md, "Peer
    # differences (session 8)"); the defaults are the paper's / GPT-2's choices
    tie_heads: bool = True  # output heads reuse the token embeddings (False: own [V, d] weights)
    ffn_act: str = "gelu"  # "gelu" | "geglu" (gated: fc1 is 2x wider, GELU(a) * b)
    layer_scale_init: float = 0.0  # > 0: a learnable per-channel scale on each residual branch (CaiT)
    emb_init_std: float = 0.0  # token / position embedding init std (0 = init_std)


@dataclass
class DistributedConfig:
    """Fleet topology and memory features (`ernie_vilg.training.distributed`, docs/distributed.md).

    World size = dp_degree x sharding_degree; the sharding group is laid out inside a node
    (contiguous ranks) and data parallelism runs across nodes, as in the paper's Figure 3.
    Global batch = micro_batch_size x accumulate_steps x dp_degree x sharding_degree, where
    Data.batch_size is what one data rank consumes per optimizer step (micro x accumulation).
    """

    dp_degree: int = 1
    sharding_degree: int = 1
    # 1: optimizer states sharded (Fleet DygraphShardingOptimizer; CPU and GPU);
    # 2: + gradients, 3: + parameters (paddle.distributed.sharding.group_sharded_parallel; GPU only)
    sharding_stage: int = 1
    # stages 2 / 3: sharded optimizer states + fp32 master weights live on the CPU (GPU only)
    offload: bool = False
    recompute: str = "none"  # "none" | "full" | "every_k" | "attention_core"
    recompute_every_k: int = 2  # every_k: blocks whose index is a multiple of k are recomputed
    amp_dtype: str = "float32"  # "float32" | "float16" | "bfloat16" (the last two need a GPU)
    amp_level: str = "O1"  # "O1" (white-list ops in low precision) | "O2" (low-precision weights)
    init_loss_scaling: float = 32768.0  # float16 dynamic loss scaling starts here
    accumulate_steps: int = 1
    micro_batch_size: int = 0  # 0 = Data.batch_size / accumulate_steps (checked to agree if set)
    # stage 3: synchronous parameter all-gather (prefetch assumes a fixed layer order per step)
    sync_comm: bool = False


@dataclass
class GenerationConfig:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_candidates: int = 1
    beam_size: int = 1
    length_penalty: float = 1.0
    max_text_len: int = 32
    decode_strategy: str = "greedy"  # "greedy" | "beam" | "sampling" (image-to-text)
    # classifier-free guidance (docs/guidance.md): logits = uncond + s * (cond - uncond); 1 = off.
    # Needs a model trained with Train.cond_drop > 0 to know its unconditional distribution.
    cfg_scale: float = 1.0  # text-to-image sampling
    caption_cfg_scale: float = 1.0  # image-to-text decoding (captions want little or none)


@dataclass
class RerankerConfig:
    """The contrastive image-text reranker (`ernie_vilg.models.reranker`, paper sec. 4.2): a text
    transformer over the WordPiece vocab and a small CNN over pixels, projected to one space."""

    embed_dim: int = 128  # shared embedding space
    text_layers: int = 2
    text_hidden: int = 128
    text_heads: int = 4
    # a patch_size x patch_size stride-patch_size stem (cheap on CPU: no full-resolution
    # layer), then one stride-2 conv stage per entry after the first (64 px / 4 -> 16 -> 8 -> 4)
    patch_size: int = 4
    image_channels: list[int] = field(default_factory=lambda: [64, 96, 128])
    # the image feature map is pooled to pool_grid x pool_grid and flattened, not averaged to
    # 1 x 1: captions name positions (左上角...), which a global average would erase
    pool_grid: int = 4
    init_temperature: float = 0.07  # InfoNCE logits = cos / T, T learned (CLIP's start value)
    max_logit_scale: float = 100.0  # 1 / T is clipped here (CLIP) for stability
    dropout: float = 0.0


@dataclass
class VQGANConfig:
    """Losses of the VQGAN tokenizer (stage `vqgan`, `vq/gan_losses.py`; taming-transformers'
    VQLPIPSWithDiscriminator). The network itself is described by the VQ section."""

    pixel_loss: str = "l1"  # "l1" (taming) | "mse"
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS over VGG16 features; needs lpips_weights
    lpips_weights: str = ""  # .pdparams of VGG16 + LPIPS heads (tools/convert_checkpoint.py); "" = none
    codebook_weight: float = 1.0
    disc_start: int = 0  # generator step at which the discriminator starts (taming: disc_start)
    disc_weight: float = 0.8  # multiplies the adaptive weight (taming ImageNet config: 0.8)
    disc_layers: int = 3  # strided 4x4 convs of the patch discriminator
    disc_channels: int = 64  # width of its first conv
    disc_lr_mult: float = 1.0  # discriminator lr = this x the generator's scheduled lr
    adaptive_weight_max: float = 1.0e4  # clip of ||grad nll|| / ||grad g|| (taming: 1e4)


@dataclass
class DVAEConfig:
    """Gumbel-softmax relaxation of the dVAE (stage `dvae`, DALL-E) and of VQ.kind=vqgan_gumbel."""

    recon_loss: str = "logit_laplace"  # "logit_laplace" (DALL-E) | "mse" | "bce" (sigmoid cross-entropy)
    logit_laplace_eps: float = 0.1  # pixels are mapped into [eps, 1 - eps] (DALL-E map_pixels)
    temp_start: float = 1.0  # gumbel-softmax temperature, cosine-annealed (DALL-E: 1 -> 1/16)
    temp_end: float = 0.0625
    temp_anneal_steps: int = 150000
    kl_weight_start: float = 0.0  # weight of KL(q || uniform), per pixel value (DALL-E: 0 -> 6.6)
    kl_weight_end: float = 6.6
    kl_warmup_steps: int = 5000  # cosine ramp of the KL weight
    straight_through: bool = False  # hard one-hot forward, soft gradient
    # dVAE stage only, NOT DALL-E: a code that was no position's argmax for this many steps takes
    # over part of a used code's region (vq/dvae_train.py plan_code_splits); 0 = off (DALL-E)
    dead_code_steps: int = 0
    # dVAE stage only, NOT DALL-E, all off by default (vq/dvae_train.py says why each exists):
    kmeans_init_batches: int = 0  # k-means init of the logits layer on this many train batches (0 = off)
    kmeans_logit_std: float = 10.0  # spread of the k-means-initialised logits over codes
    encoder_freeze_steps: int = 0  # the encoder gets zero gradients for the first N steps
    encoder_lr_scale: float = 1.0  # the encoder's lr multiplier


@dataclass
class E2EConfig:
    """End-to-end text-to-image (paper sec. 3.1.3): generator + reconstructor trained jointly."""

    gen_weight: float = 1.0  # weight of the text-to-image NLL (the paper: equal weights)
    rec_weight: float = 1.0  # weight of the reconstruction loss
    i2t_weight: float = 1.0  # weight of the image-to-text NLL (the bidirectional model keeps it)
    rec_loss: str = "mse"  # "mse" | "l1", on images in [-1, 1]
    mlp_hidden: int = 0  # hidden width of the hidden-state -> z_emb MLP (0 = Model.hidden_size)
    init_from_tokenizer: bool = True  # reconstructor starts as a copy of the tokenizer's decoder
    # the reconstructor's own schedule (MLP + decoder; Table 7's knobs): its lr is Optimizer's
    # schedule x rec_lr_scale, ramped linearly from 0 over rec_warmup_steps once it starts
    rec_lr_scale: float = 1.0
    rec_warmup_steps: int = 0
    rec_start_step: int = 0  # no reconstruction loss before this step (= how long the reconstructor trains)


@dataclass
class VQAConfig:
    """Generative VQA fine-tuning (paper sec. 4.4, `Global.stage: vqa`, docs/vqa.md)."""

    init_from: str = ""  # vilg checkpoint to start from (text rows matched by token); "" = from scratch
    max_question_len: int = 32  # ids kept of `[CLS] question [SEP]` (the source text prefix)
    max_answer_len: int = 16  # ids kept of `answer [SEP]`; also the decoding budget


@dataclass
class FinetuneConfig:
    """Caption fine-tuning from a pre-trained vilg checkpoint (paper sec. 4.3,
    `Global.stage: caption_finetune`, docs/finetune.md)."""

    init_from: str = ""  # vilg checkpoint (step or run folder): weights only, fresh optimizer; required
    directions: str = "img2txt"  # "img2txt" (caption loss only) | "both" (+ text-to-image, Eq. 3)
    eval_items: int = 0  # validation items captioned and scored (0 = the whole split)
    best_metric: str = "caption_CIDEr"  # validation metric whose maximum is kept in OUTPUT/best
    with_meteor: bool = False  # METEOR needs Java (metrics/caption.py); off keeps validation light


@dataclass
class Config:
    Global: GlobalConfig = field(default_factory=GlobalConfig)
    Data: DataConfig = field(default_factory=DataConfig)
    VQ: VQConfig = field(default_factory=VQConfig)
    Model: ModelConfig = field(default_factory=ModelConfig)
    Optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    Train: TrainConfig = field(default_factory=TrainConfig)
    Distributed: DistributedConfig = field(default_factory=DistributedConfig)
    Generation: GenerationConfig = field(default_factory=GenerationConfig)
    Reranker: RerankerConfig = field(default_factory=RerankerConfig)
    VQGAN: VQGANConfig = field(default_factory=VQGANConfig)
    DVAE: DVAEConfig = field(default_factory=DVAEConfig)
    E2E: E2EConfig = field(default_factory=E2EConfig)
    VQA: VQAConfig = field(default_factory=VQAConfig)
    Finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Type checking
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError. Only lossless conversions."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {short_repr(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {short_repr(value)}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool, got {short_repr(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {short_repr(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected float, got {short_repr(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected str, got {short_repr(value)}")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
MAX_YAML_BYTES = 1 << 20  # a config is a few KB; a checkpoint's config.yaml about 5 KB
# values after alias expansion: YAML aliases share nodes, so a few hundred bytes can stand for
# billions of items ("billion laughs"); the real configs have a few hundred
MAX_YAML_NODES = 100_000


def _expanded_nodes(obj: Any, memo: dict[int, int], limit: int) -> int:
    """Number of nodes of `obj` with every alias expanded (shared sub-objects counted each time
    they are referenced), computed without expanding anything; stops counting past `limit`."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        return 1
    memo[key] = limit + 1  # a (malformed) self-reference counts as too big
    total = 1
    for child in children:
        total += _expanded_nodes(child, memo, limit)
        if total > limit:
            break
    memo[key] = total
    return total


def safe_yaml_load(text: str | bytes, where: str) -> Any:
    """yaml.safe_load for outside text (config files, a checkpoint's config.yaml, safetensors
    metadata) with a size limit and an alias-expansion limit; ConfigError naming `where`."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text)} bytes is too large for a config (limit {MAX_YAML_BYTES})")
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: not valid YAML ({short_repr(first, 200)})") from None
    if _expanded_nodes(data, {}, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(f"{where}: more than {MAX_YAML_NODES} values once YAML aliases are expanded "
                          "(an alias bomb?)")
    return data


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """Read a YAML file, resolving `_base_` (a path or list of paths relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(str(p) for p in seen)}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = safe_yaml_load(path.read_bytes(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise ConfigError(f"{path}: _base_ = {short_repr(bases)}: must be a file path or a list of file paths")
    merged: dict[str, dict[str, Any]] = {}
    for base in bases:
        base_data = _read_yaml(path.parent / base, seen + (path,))
        for section, values in base_data.items():
            merged.setdefault(section, {}).update(values)
    for section, values in raw.items():
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {short_repr(section)} must be a mapping, got {short_repr(values)}")
        # remember which file set each key, for error messages
        merged.setdefault(section, {}).update({k: (v, path) for k, v in values.items()})
    return merged


def _unwrap(value: Any, default_file: str) -> tuple[Any, str]:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Path):
        return value[0], str(value[1])
    return value, default_file


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split `Section.key=value`; the value goes through `ast.literal_eval` (strings may be bare)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {short_repr(text)}: expected the form Section.key=value")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    rhs = rhs.strip()
    if rhs.lower() in ("true", "false"):
        return section, key, rhs.lower() == "true"
    try:
        value = ast.literal_eval(rhs)
    except (ValueError, SyntaxError):
        value = rhs  # a bare string such as a path
    return section, key, value


def build_config(data: dict[str, dict[str, Any]], source: str = "<dict>") -> Config:
    """Validate a {section: {key: value}} mapping into a Config: types, then each section's ranges."""
    cfg = Config()
    section_fields = {f.name: f for f in dataclasses.fields(Config)}
    origins: dict[tuple[str, str], str] = {}
    for section, values in data.items():
        if section not in section_fields:
            raise ConfigError(
                f"{source}: unknown section {_short_name(section)!r} (known: {', '.join(section_fields)})"
            )
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section} must be a mapping, got {short_repr(values)}")
        target = getattr(cfg, section)
        hints = _section_types(type(target))
        for key, value in values.items():
            value, where_file = _unwrap(value, source)
            if key not in hints:
                raise ConfigError(
                    f"{where_file}: unknown key {section}.{_short_name(key)} (known: {', '.join(hints)})"
                )
            setattr(target, key, _coerce(value, hints[key], f"{where_file}: {section}.{key}"))
            origins[(section, key)] = where_file
    validate_config(cfg, origins, source)
    return cfg


# --------------------------------------------------------------------------------------------
# Range checks: one validator per section, run when a config is built (before any I/O), so an
# out-of-range value stops a tool with one line instead of a traceback (or a silent run) later
# --------------------------------------------------------------------------------------------
# Values whose code lives in upper floors (config.py imports nothing of the project); a test
# checks each tuple against the registry it mirrors.
ATTENTION_IMPLS = ("dense", "sparse_reference", "sparse_blockwise")  # the attention cores of models/attention.py
SCHEDULES = ("constant", "cosine")  # training/schedule.py learning_rate
OPTIMIZERS = ("adamw",)  # training/trainer.py build_optimizer
DEVICES = ("cpu", "gpu")  # training/distributed.py
DECODE_STRATEGIES = ("greedy", "beam", "sampling")  # generation/captions.py decode_captions


class _Range:
    """Checks of one section; a failure names the file (or -o override), key, value and range."""

    def __init__(self, name: str, section: Any, origins: dict[tuple[str, str], str], source: str) -> None:
        self.name, self.section, self.origins, self.source = name, section, origins, source

    def fail(self, key: str, allowed: str) -> None:
        where = self.origins.get((self.name, key), self.source)
        value = getattr(self.section, key)
        raise ConfigError(f"{where}: {self.name}.{key} = {short_repr(value)}: {allowed}")

    def int_min(self, key: str, lo: int) -> None:
        if getattr(self.section, key) < lo:
            self.fail(key, f"must be an integer >= {lo}")

    def number(self, key: str, lo: Optional[float] = None, hi: Optional[float] = None,
               lo_open: bool = False, hi_open: bool = False) -> None:
        """A finite number in the interval; inf / nan are never a meaningful setting here."""
        v = getattr(self.section, key)
        bad = not math.isfinite(v)
        bad = bad or (lo is not None and (v <= lo if lo_open else v < lo))
        bad = bad or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            left = "any" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
            right = "" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
            self.fail(key, f"must be a finite number in {left}, {right or 'inf)'}" if lo is not None
                      else "must be a finite number")

    def one_of(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self.section, key) not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}")


def _check_global(r: _Range, cfg: Config) -> None:
    r.one_of("device", DEVICES)
    r.int_min("num_threads", 0)


def _check_data(r: _Range, cfg: Config) -> None:
    d = r.section
    r.int_min("batch_size", 1)
    r.int_min("num_workers", 0)
    r.int_min("image_size", 1)
    if cfg.Global.stage in ("vq", "vqgan", "dvae") and d.image_size % max(1, cfg.VQ.downsample_factor):
        r.fail("image_size", f"must be a multiple of VQ.downsample_factor ({cfg.VQ.downsample_factor})")
    r.int_min("max_text_len", 3)  # [CLS], at least one token, [SEP]
    r.int_min("stream_partitions", 1)
    r.int_min("shuffle_buffer", 1)


def _check_vq(r: _Range, cfg: Config) -> None:
    for key in ("in_channels", "hidden_channels", "num_res_blocks", "downsample_factor", "patch_size",
                "codebook_size", "embed_dim"):
        r.int_min(key, 1)
    r.int_min("dead_code_steps", 0)
    r.number("beta", 0.0)
    r.number("ema_decay", 0.0, 1.0, hi_open=True)


def _check_optimizer(r: _Range, cfg: Config) -> None:
    r.one_of("name", OPTIMIZERS)
    r.one_of("schedule", SCHEDULES)
    r.number("lr", 0.0, lo_open=True)
    r.number("min_lr", 0.0)
    if r.section.min_lr > r.section.lr:
        r.fail("min_lr", f"must be <= Optimizer.lr ({r.section.lr:g})")
    r.int_min("warmup_steps", 0)
    r.number("weight_decay", 0.0)
    r.number("beta1", 0.0, 1.0, hi_open=True)
    r.number("beta2", 0.0, 1.0, hi_open=True)
    r.number("eps", 0.0, lo_open=True)
    r.number("grad_clip", 0.0)


def _check_train(r: _Range, cfg: Config) -> None:
    r.int_min("max_steps", 1)
    r.number("max_minutes", 0.0)
    r.int_min("log_every", 1)
    for key in ("eval_every", "save_every", "keep_last"):
        r.int_min(key, 0)
    r.int_min("eval_samples", 1)
    r.int_min("max_consecutive_skips", 1)
    r.number("cond_drop", 0.0, 1.0)  # 1 = always the null condition (tests use it)
    r.number("txt2img_weight", 0.0)
    r.number("img2txt_weight", 0.0)
    r.int_min("loss_chunk_tokens", 0)


def _check_model(r: _Range, cfg: Config) -> None:
    m = r.section
    for key in ("num_layers", "hidden_size", "num_heads", "ffn_mult"):
        r.int_min(key, 1)
    if m.hidden_size % m.num_heads:
        r.fail("hidden_size", f"must be divisible by Model.num_heads ({m.num_heads})")
    r.number("dropout", 0.0, 1.0, hi_open=True)
    r.one_of("attention_impl", ATTENTION_IMPLS)
    if m.conv_kernel < 1 or m.conv_kernel % 2 == 0:
        r.fail("conv_kernel", "must be an odd integer >= 1")
    r.number("mask_fill_value")
    for key in ("text_vocab_size", "image_vocab_size", "image_grid"):
        r.int_min(key, 0)  # 0 = derived from the data
    r.int_min("max_text_len", 3)
    r.number("layer_norm_eps", 0.0, lo_open=True)
    r.number("init_std", 0.0, lo_open=True)


def _check_generation(r: _Range, cfg: Config) -> None:
    r.number("temperature", 0.0, lo_open=True)
    r.int_min("top_k", 0)
    r.number("top_p", 0.0, 1.0, lo_open=True)
    for key in ("num_candidates", "beam_size", "max_text_len"):
        r.int_min(key, 1)
    r.number("length_penalty")
    r.one_of("decode_strategy", DECODE_STRATEGIES)
    r.number("cfg_scale")
    r.number("caption_cfg_scale")


SECTION_VALIDATORS: dict[str, Callable[[_Range, Config], None]] = {
    "Global": _check_global, "Data": _check_data, "VQ": _check_vq, "Optimizer": _check_optimizer,
    "Train": _check_train, "Model": _check_model, "Generation": _check_generation,
}


def validate_config(cfg: Config, origins: Optional[dict[tuple[str, str], str]] = None,
                    source: str = "<config>") -> None:
    """Range checks of every section; ConfigError (one line: file, key, value, allowed range)."""
    for name, check in SECTION_VALIDATORS.items():
        check(_Range(name, getattr(cfg, name), origins or {}, source), cfg)


def load_config(path: str | Path | None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (with `_base_`) and apply `Section.key=value` overrides."""
    data: dict[str, dict[str, Any]] = _read_yaml(Path(path)) if path else {}
    source = str(Path(path).resolve()) if path else "<defaults>"
    for text in overrides or []:
        section, key, value = parse_override(text)
        data.setdefault(section, {})[key] = (value, Path(f"-o {text}"))
    return build_config(data, source)


def config_from_dict(data: dict[str, dict[str, Any]], source: str = "<dict>") -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a checkpoint's config.yaml)."""
    return build_config(data, source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (every checkpoint folder stores one)."""
    text = yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")


def load_saved_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = safe_yaml_load(path.read_bytes(), str(path)) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: checkpoint has no config.yaml") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return build_config(data, str(path))
