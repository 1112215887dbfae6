"""The networks: masks and sparse patterns, attention, the shared bidirectional transformer, the
Eq. 3-5 criterion and the other losses, the end-to-end reconstructor, the reranker. The training
stages that use them are `ernie_vilg.stages`."""
from ernie_vilg.models.losses import VilgCriterion, VilgLoss
from ernie_vilg.models.sparse_masks import Direction, LayerKind, StreamLayout, layer_kinds, stream_mask
from ernie_vilg.models.transformer import ErnieViLG, flops_per_token, num_params, size_report

__all__ = [
    "Direction", "ErnieViLG", "LayerKind", "StreamLayout", "VilgCriterion", "VilgLoss", "flops_per_token",
    "layer_kinds", "num_params", "size_report", "stream_mask",
]
