"""Fleet topology, validation of the `Distributed` section, and wrapping per sharding stage.

The paper's 2-D layout (Figure 3): the world is `dp_degree x sharding_degree`; model states are
sharded along the inner dimension (contiguous ranks, i.e. inside a machine) and data is split
along both (sharding is data parallel for activations). Rank r has

    dp_rank = r // sharding_degree        sharding_rank = r % sharding_degree

which is Fleet's hybrid order ['dp', 'pp', 'sharding', ...] with pp = mp = 1 (checked against the
hybrid communicate group after `fleet.init`).

Stages:
    1    Fleet's DygraphShardingOptimizer (whole parameters partitioned greedily by size; each rank
         updates its own and broadcasts). Runs on CPU over gloo, so it is what CI exercises.
    2/3  `paddle.distributed.sharding.group_sharded_parallel` ('os_g' / 'p_g_os'), optionally with
         `offload` (optimizer states and fp32 master weights on the CPU). GPU only in Paddle 3.3.

All Fleet calls go through `FleetApi`, so the GPU-only paths are tested for their wiring with a
recording stand-in.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import paddle

from ernie_vilg.runtime import world_from_env
from ernie_vilg.config import Config, ConfigError, DistributedConfig

log = logging.getLogger(__name__)

RECOMPUTE_POLICIES = ("none", "full", "every_k", "attention_core")
AMP_DTYPES = ("float32", "float16", "bfloat16")
AMP_LEVELS = ("O1", "O2")


# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """Where this process sits in the dp x sharding grid."""

    world_size: int
    rank: int
    dp_degree: int
    sharding_degree: int
    sharding_stage: int
    device: str  # "cpu" | "gpu"

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sharding_degree

    @property
    def sharding_rank(self) -> int:
        return self.rank % self.sharding_degree

    @property
    def data_rank(self) -> int:
        # every sharding rank reads different data too: data rank = dp_rank * S + sharding_rank
        return self.dp_rank * self.sharding_degree + self.sharding_rank

    @property
    def data_world(self) -> int:
        return self.dp_degree * self.sharding_degree

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.sharding_degree > 1

    def sharding_groups(self) -> list[list[int]]:
        s = self.sharding_degree
        return [[d * s + i for i in range(s)] for d in range(self.dp_degree)]

    def dp_groups(self) -> list[list[int]]:
        s = self.sharding_degree
        return [[d * s + i for d in range(self.dp_degree)] for i in range(s)]

    def describe(self) -> str:
        mode = {1: "stage 1 (optimizer states)", 2: "stage 2 (optimizer states + gradients)",
                3: "stage 3 (optimizer states + gradients + parameters)"}[self.sharding_stage]
        lines = [f"topology: world {self.world_size} = dp {self.dp_degree} x sharding {self.sharding_degree}"
                 f" on {self.device}; sharding {mode if self.sharded else 'off'}",
                 f"  sharding groups (inside a node): {self.sharding_groups()}",
                 f"  data-parallel groups (across nodes): {self.dp_groups()}"]
        return "\n".join(lines)


def device_of(cfg: Config) -> str:
    return "gpu" if cfg.Global.device == "gpu" else "cpu"


def validate(cfg: Config, world_size: int, device: Optional[str] = None,
             gpus_per_node: Optional[int] = None) -> list[str]:
    """Raise ConfigError for impossible combinations; return warnings for risky ones.

    `device` defaults to Global.device; `gpus_per_node` (when known) checks that a sharding group
    fits inside one node, which is what keeps sharding traffic off the inter-node network.
    """
    d: DistributedConfig = cfg.Distributed
    device = device or device_of(cfg)
    warnings: list[str] = []
    for key in ("dp_degree", "sharding_degree", "accumulate_steps", "recompute_every_k"):
        if getattr(d, key) < 1:
            raise ConfigError(f"Distributed.{key} must be >= 1, got {getattr(d, key)}")
    if d.sharding_stage not in (1, 2, 3):
        raise ConfigError(f"Distributed.sharding_stage must be 1, 2 or 3, got {d.sharding_stage}")
    if d.recompute not in RECOMPUTE_POLICIES:
        raise ConfigError(f"Distributed.recompute: unknown policy {d.recompute!r} "
                          f"(known: {', '.join(RECOMPUTE_POLICIES)})")
    if d.amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"Distributed.amp_dtype: unknown dtype {d.amp_dtype!r} (known: {', '.join(AMP_DTYPES)})")
    if d.amp_level not in AMP_LEVELS:
        raise ConfigError(f"Distributed.amp_level: unknown level {d.amp_level!r} (known: {', '.join(AMP_LEVELS)})")
    degrees = d.dp_degree * d.sharding_degree
    if degrees != world_size:
        how = ("run it with `python -m paddle.distributed.launch --nproc_per_node "
               f"{degrees} tools/train.py ...` (or --devices on GPU)") if world_size == 1 else \
              "set the degrees so that their product equals the number of processes"
        raise ConfigError(f"Distributed.dp_degree ({d.dp_degree}) x Distributed.sharding_degree "
                          f"({d.sharding_degree}) = {degrees}, but {world_size} process(es) were "
                          f"launched: {how}")
    if gpus_per_node and d.sharding_degree > gpus_per_node:
        warnings.append(f"sharding_degree {d.sharding_degree} > {gpus_per_node} GPUs per node: the "
                        "sharding group spans nodes, so its communication leaves the machine "
                        "(the paper keeps it inside one)")
    if gpus_per_node and d.sharding_degree <= gpus_per_node and gpus_per_node % d.sharding_degree:
        raise ConfigError(f"Distributed.sharding_degree {d.sharding_degree} does not divide "
                          f"{gpus_per_node} GPUs per node: a sharding group would straddle two nodes")
    if device != "gpu":
        if d.sharding_stage in (2, 3):
            raise ConfigError(f"Distributed.sharding_stage={d.sharding_stage} needs a GPU: stages 2 and 3 use "
                              "paddle.distributed.sharding.group_sharded_parallel, which Paddle 3.3 "
                              "supports only on GPU/XPU; use sharding_stage=1 on CPU")
        if d.offload:
            raise ConfigError("Distributed.offload=true needs a GPU (it moves optimizer states and master "
                              "weights from GPU to CPU memory); set it to false on CPU")
        if d.amp_dtype != "float32":
            raise ConfigError(f"Distributed.amp_dtype={d.amp_dtype} needs a GPU: on CPU Paddle's auto_cast "
                              "and GradScaler silently fall back to float32; set amp_dtype=float32")
        if d.sharding_degree > 2 or (d.sharding_degree > 1 and d.dp_degree > 2):
            warnings.append("gloo sub-groups of more than 2 ranks are flaky on CPU in Paddle 3.3 "
                            "(connection refused / hangs; see docs/distributed.md); keep every CPU "
                            "sub-group at 2 ranks, e.g. dp2 x sharding2")
    if d.sharding_stage in (2, 3) and d.sharding_degree < 2:
        raise ConfigError(f"Distributed.sharding_stage={d.sharding_stage} needs sharding_degree >= 2 "
                          "(group_sharded_parallel refuses a 1-rank group); use stage 1 for pure data parallel")
    if d.offload:
        if d.sharding_stage == 1:
            raise ConfigError("Distributed.offload with sharding_stage=1 is not supported: offload is "
                              "implemented with group_sharded_parallel; use sharding_stage=3 (the paper's "
                              "recipe: sharded states + master weights on CPU, dp across nodes)")
        if d.sharding_degree < 2:
            raise ConfigError("Distributed.offload needs sharding_degree >= 2")
        if d.sharding_stage == 2 and d.dp_degree > 1:
            raise ConfigError("Distributed.offload with sharding_stage=2 and dp_degree > 1 is refused by "
                              "Paddle ('please use pure sharding stage2, exclude data parallel'); use "
                              "sharding_stage=3 with offload for dp x sharding")
        if d.sharding_stage == 2 and not (d.amp_dtype == "float16" and d.amp_level == "O2"):
            raise ConfigError("Distributed.offload with sharding_stage=2 needs amp_dtype=float16 and "
                              "amp_level=O2 (Paddle's stage-2 offload only handles pure fp16 parameters); "
                              "use sharding_stage=3 for bfloat16 / float32")
    if d.amp_level == "O2" and d.amp_dtype == "float32":
        raise ConfigError("Distributed.amp_level=O2 casts weights to low precision: set amp_dtype to "
                          "float16 or bfloat16 (or leave amp_level=O1 with float32)")
    micro_batch_size(cfg)  # raises on an inconsistent batch split
    return warnings


def micro_batch_size(cfg: Config) -> int:
    """Data.batch_size (per data rank per optimizer step) split into accumulate_steps micro batches."""
    d, batch = cfg.Distributed, cfg.Data.batch_size
    if batch % d.accumulate_steps:
        raise ConfigError(f"Data.batch_size {batch} (per data rank and optimizer step) is not divisible "
                          f"by Distributed.accumulate_steps {d.accumulate_steps}")
    micro = batch // d.accumulate_steps
    if d.micro_batch_size and d.micro_batch_size != micro:
        raise ConfigError(f"Distributed.micro_batch_size {d.micro_batch_size} disagrees with Data.batch_size "
                          f"{batch} / accumulate_steps {d.accumulate_steps} = {micro}; set it to {micro} or 0")
    return micro


def global_batch_size(cfg: Config) -> int:
    d = cfg.Distributed
    return micro_batch_size(cfg) * d.accumulate_steps * d.dp_degree * d.sharding_degree


def resolve_topology(cfg: Config, rank: int, world_size: int, device: Optional[str] = None) -> Topology:
    """Validate and build the Topology (no communication)."""
    for w in validate(cfg, world_size, device):
        log.warning(w)
    d = cfg.Distributed
    return Topology(world_size=world_size, rank=rank, dp_degree=d.dp_degree,
                    sharding_degree=d.sharding_degree, sharding_stage=d.sharding_stage,
                    device=device or device_of(cfg))


# --------------------------------------------------------------------------------------------
# The gloo sub-group workaround
# --------------------------------------------------------------------------------------------
_SERIALIZED_MARK = "_ernie_vilg_serialized"


def serialize_group_creation() -> bool:
    """Put a global barrier after every `new_group` (CPU / gloo, > 2 processes).

    Why: Paddle 3.3's ProcessGroupGloo rendezvous reuses the same store keys for every group, so
    groups created back to back (the dp groups [0,2] and [1,3] of dp2 x sharding2) can read a
    peer address of another group and fail with 'connection refused' or hang. Serializing group
    creation with a barrier made dp2 x sharding2 pass (see the project's notes). This patches
    `paddle.distributed.new_group` (the name Fleet's topology code calls) once per process and
    must run before `fleet.init`. Returns True if the patch is (now) installed.
    """
    import paddle.distributed as dist
    import paddle.distributed.collective as collective

    if getattr(dist.new_group, _SERIALIZED_MARK, False):
        return True
    original = collective.new_group

    def new_group_serialized(*args: Any, **kwargs: Any) -> Any:
        group = original(*args, **kwargs)
        if dist.is_initialized():
            dist.barrier()  # on the default (global) group
        return group

    setattr(new_group_serialized, _SERIALIZED_MARK, True)
    dist.new_group = collective.new_group = new_group_serialized
    return True


# --------------------------------------------------------------------------------------------
# Fleet calls (one seam, so tests can record them)
# --------------------------------------------------------------------------------------------
class FleetApi:
    """The Paddle calls the engine makes; tests substitute a recorder for the GPU-only ones."""

    def init(self, topo: Topology, accumulate_steps: int) -> Any:
        from paddle.distributed import fleet

        strategy = fleet.DistributedStrategy()
        strategy.hybrid_configs = {"dp_degree": topo.dp_degree, "mp_degree": 1, "pp_degree": 1,
                                   "sharding_degree": topo.sharding_degree}
        # nested dict assignment is rejected by the proto setter: set sharding fields afterwards
        sc = strategy.hybrid_configs["sharding_configs"]
        sc.split_param = False  # V1: whole parameters per rank (V2's fused buffers are GPU only)
        sc.tensor_fusion = False
        sc.comm_overlap = False
        sc.accumulate_steps = accumulate_steps
        fleet.init(is_collective=True, strategy=strategy)
        return fleet.get_hybrid_communicate_group()

    def distributed_model(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        from paddle.distributed import fleet

        return fleet.distributed_model(model)

    def distributed_optimizer(self, optimizer: Any) -> Any:
        from paddle.distributed import fleet

        return fleet.distributed_optimizer(optimizer)

    def distributed_scaler(self, scaler: Any) -> Any:
        from paddle.distributed import fleet

        return fleet.distributed_scaler(scaler)

    def group_sharded_parallel(self, model: paddle.nn.Layer, optimizer: Any, level: str, **kwargs: Any) -> tuple:
        from paddle.distributed.sharding import group_sharded_parallel

        return group_sharded_parallel(model, optimizer, level, **kwargs)

    def sync_params_buffers(self, model: paddle.nn.Layer, group: Any) -> None:
        from paddle.distributed.fleet.utils.hybrid_parallel_util import sync_params_buffers

        sync_params_buffers(model, comm_group=group, src_rank=group.ranks[0], fuse_params=False)

    def decorate(self, model: paddle.nn.Layer, optimizer: Any, level: str, dtype: str) -> tuple:
        return paddle.amp.decorate(models=model, optimizers=optimizer, level=level, dtype=dtype)

    def grad_scaler(self, init_loss_scaling: float) -> Any:
        return paddle.amp.GradScaler(init_loss_scaling=init_loss_scaling, use_dynamic_loss_scaling=True)


def inner_layer(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """The user's model inside Fleet (`_layers`) or group-sharded (`_layer`) wrappers."""
    for attr in ("_layers", "_layer"):
        inner = getattr(model, attr, None)
        if isinstance(inner, paddle.nn.Layer):
            return inner_layer(inner)
    return model


@dataclass
class Wrapped:
    model: paddle.nn.Layer
    optimizer: Any
    scaler: Any  # None unless float16
    scaler_kind: str  # "none" | "GradScaler" | "fleet.distributed_scaler" | "GroupShardedScaler"


class ParallelContext:
    """Everything the Trainer needs to know about the process group, built once per run."""

    def __init__(self, cfg: Config, topo: Topology, api: Optional[FleetApi] = None, hcg: Any = None) -> None:
        self.cfg, self.topo = cfg, topo
        self.api = api or FleetApi()
        self.hcg = hcg

    @classmethod
    def create(cls, cfg: Config, api: Optional[FleetApi] = None) -> "ParallelContext":
        """Resolve the topology from the launcher's environment and initialise Fleet if needed."""
        rank, world = world_from_env()
        if device_of(cfg) == "gpu" and not paddle.is_compiled_with_cuda():
            raise ConfigError("Global.device=gpu, but this Paddle build has no CUDA (install paddlepaddle-gpu, "
                              "or set Global.device=cpu)")
        topo = resolve_topology(cfg, rank, world)
        api = api or FleetApi()
        hcg = None
        if topo.distributed:
            if topo.device == "cpu" and world > 2:
                serialize_group_creation()
            hcg = api.init(topo, cfg.Distributed.accumulate_steps)
            _check_layout(topo, hcg)
        if rank == 0:
            # one process has nothing to report: at INFO the lines would precede every one-line
            # error of tools/train.py on stderr
            log.log(logging.INFO if topo.distributed else logging.DEBUG,
                    "%s\nglobal batch %d = micro %d x accumulation %d x dp %d x sharding %d",
                     topo.describe(), global_batch_size(cfg), micro_batch_size(cfg),
                     cfg.Distributed.accumulate_steps, topo.dp_degree, topo.sharding_degree)
        return cls(cfg, topo, api, hcg)

    # ---- wrapping ----------------------------------------------------------------------------
    def wrap(self, model: paddle.nn.Layer, optimizer: Any) -> Wrapped:
        """AMP decoration, then the wrappers of the configured stage, then the matching scaler."""
        d, topo, api = self.cfg.Distributed, self.topo, self.api
        if d.amp_level == "O2" and d.amp_dtype != "float32":
            model, optimizer = api.decorate(model, optimizer, "O2", d.amp_dtype)
        # float16 needs dynamic loss scaling; bfloat16 has float32's exponent range and does not
        scaler = api.grad_scaler(d.init_loss_scaling) if d.amp_dtype == "float16" else None
        if not topo.distributed:
            return Wrapped(model, optimizer, scaler, "GradScaler" if scaler else "none")
        if d.sharding_stage == 1:
            model = api.distributed_model(model)
            optimizer = api.distributed_optimizer(optimizer)
            if scaler is not None:
                # found_inf is all-reduced (MAX) so that all ranks skip the same steps
                scaler = api.distributed_scaler(scaler)
            return Wrapped(model, optimizer, scaler, "fleet.distributed_scaler" if scaler else "none")
        sd_group = self.hcg.get_sharding_parallel_group()
        dp_group = self.hcg.get_data_parallel_group() if topo.dp_degree > 1 else None
        if d.sharding_stage == 3 and dp_group is not None:
            # stage 3 slices parameters at wrap time: replicas must start from identical weights
            api.sync_params_buffers(model, dp_group)
        level = "os_g" if d.sharding_stage == 2 else "p_g_os"
        kwargs: dict[str, Any] = {"scaler": scaler, "group": sd_group, "offload": d.offload, "dp_group": dp_group}
        if d.sharding_stage == 3:
            kwargs["sync_comm"] = d.sync_comm
        # group_sharded_parallel wraps a GradScaler in GroupShardedScaler itself
        model, optimizer, scaler = api.group_sharded_parallel(model, optimizer, level, **kwargs)
        return Wrapped(model, optimizer, scaler, "GroupShardedScaler" if scaler is not None else "none")

    def full_model_state(self, model: paddle.nn.Layer) -> dict[str, Any]:
        """Complete weights of a stage-3 model (a collective: every rank must call it)."""
        model.get_all_parameters(convert2cpu=True)
        return inner_layer(model).state_dict()

    # ---- accumulation ------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, model: paddle.nn.Layer, last_micro_step: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on all but the last micro step.

        Only a plain DataParallel wrapper (dp > 1, sharding 1) reduces in backward; Fleet's
        sharding wrapper reduces at `step()` and group-sharded stages reduce in their own hooks
        (they have no no_sync, and PaddleNLP notes they must not use one)."""
        if not last_micro_step and hasattr(model, "no_sync") and self.topo.distributed \
                and self.cfg.Distributed.sharding_degree == 1:
            with model.no_sync():
                yield
        else:
            yield

    # ---- collectives the loop needs -----------------------------------------------------------
    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Average float logs over all ranks (so that logs equal a single-process run's)."""
        if not self.topo.distributed or not values:
            return values
        import paddle.distributed as dist

        keys = sorted(values)
        t = paddle.to_tensor([float(values[k]) for k in keys], dtype="float64")
        dist.all_reduce(t)
        return {k: float(v) / self.topo.world_size for k, v in zip(keys, t.numpy().tolist())}

    def any_rank(self, flag: bool) -> bool:
        """True if `flag` holds on any rank (ranks must agree to skip a step, or they hang)."""
        if not self.topo.distributed:
            return flag
        import paddle.distributed as dist

        t = paddle.to_tensor([1 if flag else 0], dtype="int32")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(int(t.numpy()[0]))

    def replica_difference(self, model: paddle.nn.Layer) -> float:
        """Largest difference between ranks of per-parameter fingerprints (0.0 = in sync).

        Under stages 1 / 2 and data parallelism every rank must hold the same weights after a
        step; a fingerprint (sum, sum of squares, position-weighted sum per parameter) is
        all-reduced with MAX and MIN instead of gathering the weights."""
        if not self.topo.distributed or (self.topo.sharded and self.cfg.Distributed.sharding_stage == 3):
            return 0.0
        import paddle.distributed as dist

        prints = []
        for p in inner_layer(model).parameters():
            x = p.astype("float64").flatten()
            weights = paddle.arange(x.shape[0], dtype="float64") / max(1, x.shape[0])
            prints += [x.sum(), (x * x).sum(), (x * weights).sum()]
        hi = paddle.stack(prints)
        lo = hi.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).abs().max())

    def barrier(self) -> None:
        if self.topo.distributed:
            import paddle.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.topo.distributed:
            return obj
        import paddle.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _check_layout(topo: Topology, hcg: Any) -> None:
    """Fleet must put rank r at (r // S, r % S); our data split and checkpoints assume it."""
    got = (hcg.get_data_parallel_rank(), hcg.get_sharding_parallel_rank())
    if got != (topo.dp_rank, topo.sharding_rank):
        raise RuntimeError(f"Fleet placed rank {topo.rank} at (dp, sharding) = {got}, expected "
                           f"({topo.dp_rank}, {topo.sharding_rank}); the hybrid order changed")
