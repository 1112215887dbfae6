"""A preallocated per-layer key/value cache for incremental decoding (both directions).

Every layer gets key / value buffers of the whole stream, [B, H, L + n, D], allocated once; a
decoding step writes one position and reads only the positions its sparse pattern allows
(`sparse_masks.visible_keys`). The next position is derived from the cache (`length`), never
passed around separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import paddle

from ernie_vilg.models.sparse_masks import StreamLayout


@dataclass
class LayerKV:
    key: paddle.Tensor  # [B, H, T_max, D]
    value: paddle.Tensor  # [B, H, T_max, D]

    def write(self, position: int, key: paddle.Tensor, value: paddle.Tensor) -> None:
        """Store key / value [B, H, t, D] at stream positions [position, position + t)."""
        t = key.shape[2]
        self.key[:, :, position:position + t] = key
        self.value[:, :, position:position + t] = value


@dataclass
class KVCache:
    layout: StreamLayout
    layers: list[LayerKV] = field(default_factory=list)
    length: int = 0  # stream positions filled so far = position of the next token

    @classmethod
    def allocate(cls, layout: StreamLayout, num_layers: int, batch_size: int, num_heads: int,
                 head_dim: int, dtype: str = "float32") -> "KVCache":
        shape = [batch_size, num_heads, layout.total, head_dim]
        layers = [LayerKV(paddle.zeros(shape, dtype), paddle.zeros(shape, dtype)) for _ in range(num_layers)]
        return cls(layout, layers, 0)

    @property
    def batch_size(self) -> int:
        return self.layers[0].key.shape[0]

    @property
    def is_full(self) -> bool:
        return self.length >= self.layout.total

    def reorder(self, index: paddle.Tensor) -> None:
        """Keep batch rows `index` [B'] (beam search: follow the surviving beams)."""
        for layer in self.layers:
            layer.key = paddle.index_select(layer.key, index, axis=0)
            layer.value = paddle.index_select(layer.value, index, axis=0)
