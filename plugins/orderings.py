"""Built-in token orderings: raster, random, block-raster and dilated."""

from __future__ import annotations

import torch

from cfkit import hookimpl
from cfkit.orderings import check_grid, fixed_order, random_order


class Raster:
    """Row-major order: left to right, top to bottom."""

    def __call__(self, batch_size, grid, generator=None):
        h, w = check_grid(grid)
        return fixed_order(torch.arange(h * w), batch_size)


class Random:
    """An independent uniformly random permutation per sample (the paper's default)."""

    def __call__(self, batch_size, grid, generator=None):
        h, w = check_grid(grid)
        return random_order(batch_size, h * w, generator)


class BlockRaster:
    """k x k blocks visited in raster order; raster order inside each block. Where k does not
    divide the grid, the last block row and column are partial (7x7 tokens in blocks of 4:
    4x4, 4x3, 3x4 and 3x3)."""

    def __init__(self, block: int = 4):
        if block < 1:
            raise ValueError(f"block-raster: block must be >= 1, got {block}")
        self.block = block

    def __call__(self, batch_size, grid, generator=None):
        h, w = check_grid(grid)
        k = self.block
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block_cols = -(-w // k)
        key = ((rows // k) * block_cols + cols // k) * (k * k) + (rows % k) * k + cols % k
        return fixed_order(torch.argsort(key.flatten()), batch_size)


class Dilated:
    """Strided phases: positions with (row % d, col % d) == phase, phases in raster order.

    With d = 2 on a 4x4 grid the first step-group is rows/cols {0, 2} (a coarse, evenly spread
    sub-grid), then (0, 1) offsets, then (1, 0), then (1, 1); raster order inside each phase.
    """

    def __init__(self, dilation: int = 2):
        if dilation < 1:
            raise ValueError(f"dilated: dilation must be >= 1, got {dilation}")
        self.dilation = dilation

    def __call__(self, batch_size, grid, generator=None):
        h, w = check_grid(grid)
        d = self.dilation
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        phase = (rows % d) * d + cols % d
        key = phase * (h * w) + rows * w + cols
        return fixed_order(torch.argsort(key.flatten()), batch_size)


@hookimpl
def register_orderings(register):
    register("raster", Raster)
    register("random", Random)
    register("block-raster", BlockRaster)
    register("dilated", Dilated)


@hookimpl
def register_defaults(register):
    """Generation goes in a random order (``cfkit sample``, the bench), as training does."""
    register("sampling.order", "random")
