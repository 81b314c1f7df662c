"""Token orderings: the order in which an (h, w) grid of tokens is generated.

An ordering is called as ``ordering(batch_size, grid, generator)`` and returns a LongTensor
``(batch_size, h*w)``: row ``b`` lists raster indices (``row * w + col``) in generation order,
the layout of the reference's ``ids_shuffle``. Randomness comes only from ``generator``.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Ordering(Protocol):
    def __call__(
        self, batch_size: int, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


def check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must be two positive sizes (h, w), got {grid!r}")
    return int(h), int(w)


def check_order(order, batch_size: int, grid: tuple[int, int], name) -> torch.Tensor:
    """An ordering's output as a LongTensor ``(batch_size, h*w)`` whose rows are permutations of
    the raster indices, else a ValueError naming the ordering ``name``."""
    result = torch.as_tensor(order)
    length = grid[0] * grid[1]
    if (result.shape != (batch_size, length) or result.is_floating_point()
            or not torch.equal(result.sort(dim=-1).values.long(),
                               torch.arange(length).expand(batch_size, -1))):
        raise ValueError(f"ordering {name!r} must give ({batch_size}, {length}) raster indices, "
                         f"each row a permutation of 0..{length - 1}")
    return result.long()


def random_order(batch_size: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An independent uniformly random permutation of ``0..length-1`` per row ``(batch_size,
    length)``: the argsort of uniform noise, as the reference draws ``ids_shuffle``."""
    return torch.argsort(torch.rand(batch_size, length, generator=generator), dim=1)


def fixed_order(order: torch.Tensor, batch_size: int) -> torch.Tensor:
    """One deterministic order ``(L,)`` repeated for a batch: ``(batch_size, L)``."""
    return order.to(torch.long).unsqueeze(0).expand(batch_size, -1).contiguous()


def inverse(order: torch.Tensor) -> torch.Tensor:
    """Position of each raster index in ``order`` (both ``(..., L)``)."""
    return torch.argsort(order, dim=-1)
