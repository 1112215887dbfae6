"""Per-GPU memory planner for the bidirectional transformer (ZeRO-style accounting).

Model states, per parameter (Psi parameters, N = sharding degree; data parallelism divides
nothing):

    weights   2 bytes (float16 / bfloat16 under O2) or 4 (float32 / O1)
    grads     same dtype as the weights
    optimizer AdamW m + v in float32: 8 bytes; float32 master weights under O2: 4 bytes

    stage 1   weights + grads + (m, v, master) / N
    stage 2   weights + (grads + m, v, master) / N
    stage 3   (weights + grads + m, v, master) / N, plus ~2 layers gathered at a time
    offload   stage 2: GPU keeps weights + grads / N; CPU holds (m, v, master + a float32 grad
              buffer) / N.  stage 3: GPU keeps the gathered layers; CPU holds the float32 master
              shard, its float32 grad, m and v (16 bytes / N)

Activations, for configs (`shape_from_config`): a model of this implementation, measured with
Paddle's allocator (benchmarks/memory_plan_10b_width.py; docs/benchmarks.md "Memory planner").
Each layer keeps `layer_units` elements per token and hidden unit (17 for norms, projections and
MLP + its attention core's score copies, by layer kind); a step's peak is the largest moment of
the backward pass, walked from the last layer: what the layers below keep under the recompute
policy (1 unit per recomputed layer, 11 under attention_core), the layer being back-propagated
(recomputed where the policy says so), its activation gradients and a fresh weight gradient next
to its sum with the accumulated one; plus the embeddings and the logits (2 float32 copies, or the
chunked loss's buffers with Train.loss_chunk_tokens). Both directions' streams count as tokens.
16-bit activations take 2 bytes per element, float32 4.

A bare `ModelShape` without `layer_units` uses Korthikanti et al. 2022 (16-bit, per layer and
micro batch of b streams of s tokens, hidden h, a heads, k keys per query):

    none            s b h (34 + 5 a k / h)
    full            2 s b h per layer (the block input) + one layer's full activations
    every_k         full for every k-th layer, none for the others
    attention_core  s b h 23 per layer + one layer's attention activations

Not counted: allocator fragmentation and communication buffers; `HEADROOM` keeps 10% spare.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ernie_vilg.config import Config, ModelConfig

GB = 1024 ** 3
HEADROOM = 0.9  # plan to fill at most 90% of a GPU (fragmentation, NCCL buffers, workspace)


@dataclass(frozen=True)
class Setting:
    sharding_stage: int
    offload: bool
    recompute: str
    micro_batch: int
    amp_dtype: str = "float16"
    amp_level: str = "O2"
    recompute_every_k: int = 2

    def label(self) -> str:
        amp = "fp32" if self.amp_dtype == "float32" else f"{self.amp_dtype} {self.amp_level}"
        return (f"stage {self.sharding_stage}{' + offload' if self.offload else ''}, recompute "
                f"{self.recompute}{f' (k={self.recompute_every_k})' if self.recompute == 'every_k' else ''}, "
                f"micro batch {self.micro_batch}, {amp}")


@dataclass
class ModelShape:
    num_params: int
    num_layers: int
    hidden: int
    heads: int
    seq_len: int  # tokens of one stream (text + image)
    keys_per_query: float  # mean keys a query attends to
    logit_elems: int  # target logits of both directions per stream: tokens x vocab
    ffn_mult: int = 4
    # measured implementation model (shape_from_config fills it; empty = Korthikanti's formula):
    # activation elements per token and hidden unit each layer keeps without recompute
    layer_units: tuple[float, ...] = ()
    ffn_in: int = 0  # fc1's output width (2 f under GEGLU): the largest block weight is h x ffn_in
    max_vocab: int = 0  # the widest head, for the chunked loss's buffers
    chunk_tokens: int = 0  # Train.loss_chunk_tokens of the config (0 = whole logits)

    @property
    def layer_params(self) -> int:
        d = self.hidden
        return 4 * d * d + 2 * self.ffn_mult * d * d


@dataclass
class Plan:
    setting: Setting
    sharding_degree: int
    dp_degree: int
    gpu: dict[str, float] = field(default_factory=dict)  # bytes per GPU by item
    cpu: dict[str, float] = field(default_factory=dict)  # bytes per GPU offloaded to host memory
    gpu_mem: float = 0.0

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())

    @property
    def fits(self) -> bool:
        return self.gpu_mem <= 0 or self.gpu_total <= HEADROOM * self.gpu_mem


def shape_from_config(cfg: Config, num_params: Optional[int] = None) -> ModelShape:
    """Shape of the bidirectional model of `cfg.Model` (sizes must be resolved, not 0)."""
    from ernie_vilg.models.sparse_masks import Direction, layer_kinds, mean_visible_keys
    from ernie_vilg.models.transformer import num_params as count, stream_layout

    m: ModelConfig = cfg.Model
    if min(m.text_vocab_size, m.image_vocab_size, m.image_grid) <= 0:
        raise ValueError("Model.text_vocab_size, image_vocab_size and image_grid must be set (not 0) to plan memory")
    seq = m.max_text_len + m.image_grid ** 2
    kinds = layer_kinds(m.num_layers, m.attention_impl)
    if m.attention_impl == "sparse_blockwise":
        layouts = [stream_layout(m, d) for d in Direction]
        keys = max(sum(mean_visible_keys(lay, k) for k in kinds) / len(kinds) for lay in layouts)
    else:
        keys = float(seq)  # a precomputed (L + n)^2 mask: full score matrices
    logits = m.image_grid ** 2 * m.image_vocab_size + (m.max_text_len - 1) * m.text_vocab_size
    units = tuple(layer_units(m, kind) for kind in kinds)
    f_in = (2 if m.ffn_act == "geglu" else 1) * m.ffn_mult * m.hidden_size
    return ModelShape(num_params or count(m), m.num_layers, m.hidden_size, m.num_heads, seq, keys, logits, m.ffn_mult,
                      units, f_in, max(m.image_vocab_size, m.text_vocab_size), cfg.Train.loss_chunk_tokens)


# ---------------------------------------------------------------------------------------------
# Activation model of this implementation (issue 19): what Paddle's autograd keeps, measured with
# benchmarks/memory_plan_10b_width.py --probe (one block's kept bytes at several head counts) and
# checked against whole training steps at the 10B width (docs/benchmarks.md). Units: elements per
# token and hidden unit, both directions' streams counted as tokens; bytes = units x s x b x h x
# the activation dtype's size.
# ---------------------------------------------------------------------------------------------
BLOCK_BASE_UNITS = 17.0  # LayerNorms, QKV, attention output, MLP (Korthikanti's 34 bytes at 16 bit)
# per layer kind: (extra units, score copies kept per stored score). Row / column: the softmax
# output and the text / image halves split from it; column adds its transposes; conv adds the
# halo-tiled key / value / query copies and the probabilities gathered into query slots; the dense
# cores keep one [T, T] probability matrix per head
KIND_COSTS = {"row": (0.0, 1.48), "column": (0.4, 1.64), "conv": (8.1, 1.91), "dense": (1.1, 1.0)}
ATTENTION_CORE_KEPT = 11.0  # attention_core keeps the block input, the residual, the MLP and its norm
MLP_UNITS = 9.0  # LayerNorm output, fc1 output, activation output: freed before the attention backward
EMBED_UNITS = 4.5  # embeddings, direction add, final LayerNorm, the heads' inputs
BACKWARD_UNITS = 4.0  # activation gradients alive while a block runs backward
LOGIT_COPIES = 2.0  # float32 logits and softmax in the forward, softmax and its gradient in the backward


def stored_keys(cfg: ModelConfig, kind: Any) -> float:
    """Score columns per head the layer's core keeps per token, averaged over both streams."""
    L, n = cfg.max_text_len, cfg.image_grid ** 2
    if cfg.attention_impl != "sparse_blockwise" or kind.value == "dense":
        return float(L + n)  # a full [T, T] score matrix
    from ernie_vilg.models.sparse_masks import conv_halo_tiles

    if kind.value == "conv":
        width = conv_halo_tiles(cfg.image_grid, cfg.image_grid, cfg.conv_kernel, True)[3].shape[1]
    else:
        width = cfg.image_grid  # one row (or column) block per image query
    # text-to-image: text rows see the text, image rows the text + their block; image-to-text:
    # image rows their block, text rows every image key + the text
    return (L * L + n * (L + width) + n * width + L * (n + L)) / (2.0 * (L + n))


def layer_units(cfg: ModelConfig, kind: Any) -> float:
    name = "dense" if cfg.attention_impl != "sparse_blockwise" else kind.value
    extra, copies = KIND_COSTS[name]
    return BLOCK_BASE_UNITS + extra + copies * cfg.num_heads * stored_keys(cfg, kind) / cfg.hidden_size


def _act_bytes_per_layer(shape: ModelShape, b: int, policy: str) -> tuple[float, float]:
    """(kept bytes per layer, transient bytes of the one layer being recomputed), 16-bit."""
    s, h, a = shape.seq_len, shape.hidden, shape.heads
    full = s * b * h * (34 + 5 * a * shape.keys_per_query / h)
    if policy == "none":
        return full, 0.0
    if policy == "full":
        return 2 * s * b * h, full
    if policy == "attention_core":
        return 23 * s * b * h, full - 23 * s * b * h
    raise ValueError(policy)


def _kept_units(units: float, index: int, setting: Setting) -> float:
    """Units a layer keeps between its forward and its backward under the recompute policy."""
    policy = setting.recompute
    if policy == "full" or (policy == "every_k" and index % max(1, setting.recompute_every_k) == 0):
        return 1.0  # the block input
    if policy == "attention_core":
        return min(units, ATTENTION_CORE_KEPT)
    return units


def step_activation_bytes(shape: ModelShape, setting: Setting, weight_bytes: float) -> float:
    """Peak activation bytes of a training step (both directions) for this implementation: the
    largest of, for each layer l as backward reaches it, what layers < l keep + layer l
    materialised (recomputed if its policy says so) + the transients of its backward: activation
    gradients and a fresh weight gradient next to its sum with the accumulated one, in its MLP
    (h x ffn_in) or in its attention (h x 3h), whose MLP activations are freed by then. Plus the
    embeddings; the logits are separate (`logit_bytes`)."""
    act = 2.0 if setting.amp_dtype != "float32" else 4.0
    tokens = 2.0 * setting.micro_batch * shape.seq_len  # two streams per item
    unit = tokens * shape.hidden * act
    h = shape.hidden
    mlp_weight = 2.0 * h * (shape.ffn_in or shape.ffn_mult * h) * weight_bytes
    attn_weight = 2.0 * 3 * h * h * weight_bytes
    peak, below = 0.0, 0.0
    for i, units in enumerate(shape.layer_units):
        mlp_moment = below * unit + min(units, ATTENTION_CORE_KEPT if setting.recompute == "attention_core"
                                        else units) * unit + mlp_weight
        attn_moment = below * unit + (units - MLP_UNITS) * unit + attn_weight
        peak = max(peak, mlp_moment, attn_moment)
        below += _kept_units(units, i, setting)
    return (EMBED_UNITS + BACKWARD_UNITS) * unit + peak


def logit_bytes(shape: ModelShape, setting: Setting, chunk_tokens: int = 0) -> float:
    """Head + cross-entropy memory: whole float32 logits of both directions, or with the chunked
    loss (Train.loss_chunk_tokens) a chunk's logits and their gradient."""
    low = setting.amp_dtype != "float32" and setting.amp_level == "O2"
    if chunk_tokens > 0 and shape.max_vocab:
        return 2.0 * chunk_tokens * shape.max_vocab * 4.0
    return setting.micro_batch * shape.logit_elems * (4.0 * LOGIT_COPIES + (2.0 if low else 0.0))


def activation_bytes(shape: ModelShape, setting: Setting) -> float:
    if shape.layer_units:
        low = setting.amp_dtype != "float32" and setting.amp_level == "O2"
        return step_activation_bytes(shape, setting, 2.0 if low else 4.0)
    b, L = setting.micro_batch, shape.num_layers
    if setting.recompute == "every_k":
        k = max(1, setting.recompute_every_k)
        recomputed = math.ceil(L / k)
        kept_full, _ = _act_bytes_per_layer(shape, b, "none")
        kept_ckpt, transient = _act_bytes_per_layer(shape, b, "full")
        total = recomputed * kept_ckpt + (L - recomputed) * kept_full + transient
    else:
        kept, transient = _act_bytes_per_layer(shape, b, setting.recompute)
        total = L * kept + transient
    scale = 2.0 if setting.amp_dtype == "float32" else 1.0
    return 2 * total * scale  # two directions per step


def plan(shape: ModelShape, setting: Setting, sharding_degree: int, dp_degree: int = 1,
         gpu_mem_gb: float = 0.0, chunk_tokens: int = 0) -> Plan:
    """Memory per GPU for one setting."""
    psi, n = float(shape.num_params), max(1, sharding_degree)
    low = setting.amp_dtype != "float32" and setting.amp_level == "O2"
    w = 2.0 if low else 4.0
    g = w
    master = 4.0 if low else 0.0
    moments = 8.0
    stage, off = setting.sharding_stage, setting.offload
    p = Plan(setting, sharding_degree, dp_degree, gpu_mem=gpu_mem_gb * GB)
    if stage == 1:
        p.gpu.update(parameters=w * psi, gradients=g * psi, optimizer_states=moments * psi / n,
                     master_weights=master * psi / n)
    elif stage == 2:
        p.gpu.update(parameters=w * psi, gradients=g * psi / n)
        if off:
            p.cpu.update(optimizer_states=moments * psi / n, master_weights=4.0 * psi / n,
                         gradients_fp32=4.0 * psi / n)
        else:
            p.gpu.update(optimizer_states=moments * psi / n, master_weights=master * psi / n)
    else:
        gathered = 2 * shape.layer_params * (w + g)  # the layer running + the one prefetched
        if off:
            p.gpu.update(parameters=gathered)
            p.cpu.update(optimizer_states=moments * psi / n, master_weights=4.0 * psi / n,
                         gradients_fp32=4.0 * psi / n)
        else:
            p.gpu.update(parameters=w * psi / n + gathered, gradients=g * psi / n,
                         optimizer_states=moments * psi / n, master_weights=master * psi / n)
    p.gpu["activations"] = activation_bytes(shape, setting)
    if shape.layer_units:
        p.gpu["logits"] = logit_bytes(shape, setting, chunk_tokens or shape.chunk_tokens)
    else:  # Korthikanti's model: logits of both directions in float32 (softmax) plus their 16-bit copy
        p.gpu["logits"] = setting.micro_batch * shape.logit_elems * (4.0 + (2.0 if low else 0.0))
    return p


def checkpoint_host_bytes(shape: ModelShape, setting: Setting, sharding_degree: int) -> dict[str, float]:
    """Host memory one GPU's process adds while saving / loading a checkpoint (checkpoint_io's
    sharded layout, docs/benchmarks.md "Checkpoint save and load"):

    - save: each tensor is copied to the host, written and dropped: the largest tensor; under
      stage 3 the full weights are gathered first, on every rank;
    - load: the weights stream into the model one tensor at a time (the largest tensor); the
      optimizer states this rank owns are read whole, then handed to the optimizer (its share:
      all of them without sharding)."""
    psi, n = float(shape.num_params), max(1, sharding_degree)
    low = setting.amp_dtype != "float32" and setting.amp_level == "O2"
    w = 2.0 if low else 4.0
    largest = float(max(shape.hidden * max(shape.max_vocab, shape.ffn_in or shape.ffn_mult * shape.hidden),
                        4 * shape.hidden * shape.hidden)) * 4.0  # fp32 moments are the widest copies
    gathered = w * psi if setting.sharding_stage == 3 else 0.0
    own_states = (8.0 + (4.0 if low else 0.0)) * psi / (n if setting.sharding_stage >= 1 and n > 1 else 1)
    return {"save": gathered + largest, "load": largest + own_states}


def refusal(setting: Setting, sharding_degree: int, dp_degree: int) -> str:
    """Why Paddle refuses this setting ('' if it does not); see distributed.validate."""
    if setting.sharding_stage > 1 and sharding_degree < 2:
        return "stages 2 / 3 need a sharding group of at least 2 GPUs"
    if setting.offload and setting.sharding_stage == 1:
        return "offload is implemented for stages 2 / 3 only"
    if setting.offload and setting.sharding_stage == 2 and dp_degree > 1:
        return "stage 2 + offload excludes data parallelism (dp > 1); use stage 3 + offload"
    fp16_o2 = setting.amp_dtype == "float16" and setting.amp_level == "O2"
    if setting.offload and setting.sharding_stage == 2 and not fp16_o2:
        return "stage 2 + offload needs float16 O2 parameters"
    return ""


def candidate_settings(base: Setting, sharding_degree: int, dp_degree: int) -> list[Setting]:
    """Settings to try, cheapest in speed first (fewer memory savers, larger micro batch)."""
    out = []
    for stage in (1, 2, 3):
        for offload in (False, True):
            probe = dataclasses.replace(base, sharding_stage=stage, offload=offload)
            if refusal(probe, sharding_degree, dp_degree):
                continue
            for policy in ("none", "attention_core", "every_k", "full"):
                for micro in sorted({base.micro_batch, 8, 4, 2, 1}, reverse=True):
                    out.append(dataclasses.replace(base, sharding_stage=stage, offload=offload,
                                                   recompute=policy, micro_batch=micro))
    return out


def _cost(s: Setting) -> tuple:
    # prefer: no offload (PCIe traffic per micro batch), lower stage, less recompute, larger micro batch
    policy_rank = {"none": 0, "attention_core": 1, "every_k": 2, "full": 3}[s.recompute]
    return (s.offload, s.sharding_stage, policy_rank, -s.micro_batch)


def fitting_settings(shape: ModelShape, base: Setting, sharding_degrees: list[int], world: int,
                     gpu_mem_gb: float, limit: int = 5) -> list[Plan]:
    """Settings (over the given sharding degrees) that fit, fastest first."""
    plans = []
    for sd in sharding_degrees:
        dp = max(1, world // sd)
        plans += [plan(shape, s, sd, dp, gpu_mem_gb) for s in candidate_settings(base, sd, dp)]
    fitting = [p for p in plans if p.fits]
    return sorted(fitting, key=lambda p: (_cost(p.setting), p.sharding_degree))[:limit]


def setting_from_config(cfg: Config) -> Setting:
    d = cfg.Distributed
    micro = cfg.Data.batch_size // max(1, d.accumulate_steps)
    return Setting(d.sharding_stage, d.offload, d.recompute, micro or 1, d.amp_dtype, d.amp_level,
                   d.recompute_every_k)


def _micro_override(batch: int, micro: int) -> str:
    # the micro batch is Data.batch_size / accumulate_steps: say which accumulation gives it
    if batch % micro == 0:
        return f"-o Distributed.accumulate_steps={batch // micro} (micro batch {micro})"
    return f"(micro batch {micro}: choose Data.batch_size / accumulate_steps = {micro})"


def fmt_gb(x: float) -> str:
    return f"{x / GB:8.2f}"


def report(cfg: Config, nodes: int, gpus_per_node: int, gpu_mem_gb: float, cpu_mem_gb: float = 0.0,
           shape: Optional[ModelShape] = None, sharding_degree: int = 0) -> tuple[str, bool]:
    """A text report: the config's setting per stage, the verdict, and settings that fit.

    The sharding degree is the config's (or `sharding_degree`), capped at the GPU count; the
    suggestions also try a sharding group of one whole node (the paper's layout)."""
    shape = shape or shape_from_config(cfg)
    world = nodes * gpus_per_node
    sharding = min(sharding_degree or cfg.Distributed.sharding_degree, world)
    dp = max(1, world // sharding)
    base = setting_from_config(cfg)
    lines = [f"model: {shape.num_params / 1e9:.3f}B parameters, {shape.num_layers} layers, hidden {shape.hidden}, "
             f"{shape.heads} heads, stream {shape.seq_len} tokens (mean {shape.keys_per_query:.0f} keys / query)",
             f"cluster: {nodes} node(s) x {gpus_per_node} GPU(s) of {gpu_mem_gb:g} GB"
             f"{f', {cpu_mem_gb:g} GB host memory per node' if cpu_mem_gb else ''} -> dp {dp} x sharding {sharding}",
             f"config setting: {base.label()}", "",
             "per-GPU GB       params    grads  opt.m+v   master  activ.  logits |   GPU  | CPU offl.",
             ]
    items = ("parameters", "gradients", "optimizer_states", "master_weights", "activations", "logits")
    rows: list[Plan] = []
    for stage, offload in ((1, False), (2, False), (3, False), (2, True), (3, True)):
        if stage > 1 and sharding < 2:
            continue
        s = dataclasses.replace(base, sharding_stage=stage, offload=offload)
        rows.append(plan(shape, s, sharding, dp, gpu_mem_gb))
    for rec in sorted({"none", "attention_core", "full"} - {base.recompute}):
        rows.append(plan(shape, dataclasses.replace(base, recompute=rec), sharding, dp, gpu_mem_gb))
    for p in rows:
        why = refusal(p.setting, sharding, dp)
        off = "+off" if p.setting.offload else "    "
        name = f"stage {p.setting.sharding_stage}{off} rc={p.setting.recompute[:6]:<6}"
        cells = "".join(fmt_gb(p.gpu.get(k, 0.0)) for k in items)
        lines.append(f"{name}{cells} |{fmt_gb(p.gpu_total)}|{fmt_gb(p.cpu_total)}"
                     f"{'  refused: ' + why if why else ('' if p.fits else '  does not fit')}")
    chosen = plan(shape, base, sharding, dp, gpu_mem_gb)
    refused = refusal(base, sharding, dp)
    ok = chosen.fits and not refused
    ckpt = checkpoint_host_bytes(shape, base, sharding)
    host_peak = chosen.cpu_total + max(ckpt.values())  # training state + the larger of save / load
    cpu_ok = not cpu_mem_gb or host_peak * gpus_per_node <= HEADROOM * cpu_mem_gb * GB
    lines += ["", f"the config's setting ({base.label()}) needs {chosen.gpu_total / GB:.1f} GB per GPU "
              f"(+ {chosen.cpu_total / GB:.1f} GB host memory per GPU, {chosen.cpu_total * gpus_per_node / GB:.0f} GB "
              f"per node): {'FITS' if ok and cpu_ok else 'DOES NOT FIT'} in {HEADROOM:.0%} of {gpu_mem_gb:g} GB"
              f"{'' if cpu_ok else ' (host memory too small)'}{f' (REFUSED by Paddle: {refused})' if refused else ''}",
              f"checkpoints add host memory per GPU: save {ckpt['save'] / GB:.2f} GB, load {ckpt['load'] / GB:.2f} GB "
              f"({max(ckpt.values()) * gpus_per_node / GB:.0f} GB per node at the larger)"]
    fits = fitting_settings(shape, base, sorted({sharding, min(gpus_per_node, world)}), world, gpu_mem_gb)
    if fits:
        lines.append("settings that fit (fastest first):")
        lines += [f"  -o Distributed.sharding_degree={p.sharding_degree} -o Distributed.dp_degree={p.dp_degree} "
                  f"-o Distributed.sharding_stage={p.setting.sharding_stage} -o Distributed.offload="
                  f"{str(p.setting.offload).lower()} -o Distributed.recompute={p.setting.recompute} "
                  f"{_micro_override(cfg.Data.batch_size, p.setting.micro_batch)}: "
                  f"{p.gpu_total / GB:.1f} GB GPU, {p.cpu_total / GB:.1f} GB CPU"
                  for p in fits]
    else:
        lines.append("no setting fits: add GPUs (a larger sharding group) or use GPUs with more memory")
    return "\n".join(lines), ok and cpu_ok


def compare_with_measured(run_dir: str | Path) -> list[dict[str, float]]:
    """Planner vs what each rank of a finished run held (`<run>/memory/rank-*.json`, written by
    the Trainer after its first step), for parameters and optimizer states (m, v + masters).

    Uses the run's resolved config (newest checkpoint) for the model size and the layout."""
    import json

    from ernie_vilg.checkpoint_io import load_checkpoint_config

    run_dir = Path(run_dir)
    _, cfg = load_checkpoint_config(run_dir)
    shape = shape_from_config(cfg)
    d = cfg.Distributed
    predicted = plan(shape, setting_from_config(cfg), d.sharding_degree, d.dp_degree)
    want_params = predicted.gpu["parameters"]
    want_opt = predicted.gpu["optimizer_states"] + predicted.gpu.get("master_weights", 0.0)
    rows = []
    for f in sorted((run_dir / "memory").glob("rank-*.json")):
        got = json.loads(f.read_text())
        have_opt = got["optimizer_state_bytes"] + got["master_weight_bytes"]
        rows.append({"rank": got["rank"], "param_bytes": got["param_bytes"], "planned_param_bytes": want_params,
                     "optimizer_bytes": have_opt, "planned_optimizer_bytes": want_opt,
                     "param_error": got["param_bytes"] / want_params - 1, "optimizer_error": have_opt / want_opt - 1})
    return rows
