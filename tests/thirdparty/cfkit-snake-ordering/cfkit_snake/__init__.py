"""The "snake" ordering: raster order with every other row reversed (boustrophedon)."""

from __future__ import annotations

import torch

import cfkit
from cfkit.orderings import check_grid, fixed_order


class Snake:
    """Row 0 left to right, row 1 right to left, and so on."""

    def __call__(self, batch_size, grid, generator=None):
        h, w = check_grid(grid)
        rows = torch.arange(h * w).reshape(h, w)
        rows[1::2] = rows[1::2].flip(-1)
        return fixed_order(rows.flatten(), batch_size)


@cfkit.hookimpl
def register_orderings(register):
    register("snake", Snake)
