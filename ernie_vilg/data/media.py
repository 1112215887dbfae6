"""Validation media: what a validation shows besides numbers (training.logging writes it).

A leaf module (numpy only): stages and evaluation code build media without importing the Trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ValidationMedia:
    """What a validation shows besides numbers: image grids (tag -> uint8 [H, W, 3]) and texts
    (tag -> markdown), logged to VisualDL; the first grid is mirrored to OUTPUT/samples/step-N.png.
    A tag names one kind only: VisualDL keeps one record type per tag (an image and a text both
    called "prompts" would lose the text)."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def media_grid(rows: list[np.ndarray], min_cell: int = 64, gap: int = 2) -> np.ndarray:
    """uint8 image rows (each [N, H, W, 3], equal N) -> one grid [H', W', 3] with grey gaps;
    images smaller than `min_cell` are upscaled by an integer factor (nearest neighbour) so that a
    32 px sample stays readable in VisualDL."""
    rows = [np.asarray(r, dtype=np.uint8) for r in rows]
    h, w = rows[0].shape[1:3]
    factor = max(1, -(-min_cell // max(1, min(h, w))))
    h, w = h * factor, w * factor
    n = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + gap) + gap, n * (w + gap) + gap, 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            big = np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            grid[y:y + h, x:x + w] = big
    return grid
