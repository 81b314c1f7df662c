"""Factorisation schedules: how L tokens are split into S autoregressive steps.

A schedule is called as ``schedule(num_tokens, generator)`` and returns a LongTensor ``(S,)``
of positive step sizes summing to ``num_tokens``. Randomness comes only from ``generator``.
The core turns sizes into the per-position step index that plans and masks use.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Schedule(Protocol):
    def __call__(self, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor: ...


def check_step_sizes(sizes, num_tokens: int) -> torch.Tensor:
    """``sizes`` as a LongTensor, or a ValueError saying why they are not a split of L."""
    sizes = torch.as_tensor(sizes, dtype=torch.long).flatten()
    if sizes.numel() == 0 or bool((sizes < 1).any()) or int(sizes.sum()) != num_tokens:
        raise ValueError(
            f"step sizes must be positive integers summing to L={num_tokens}, "
            f"got {sizes.tolist()}"
        )
    return sizes


def equal_split(total: int, parts: int) -> torch.Tensor:
    """``total`` as ``parts`` sizes ``(parts,)`` as equal as possible, the larger ones first;
    a ValueError unless ``1 <= parts <= total``."""
    if not 1 <= parts <= total:
        raise ValueError(f"{parts} steps cannot split L={total} tokens")
    base, extra = divmod(total, parts)
    return base + (torch.arange(parts) < extra).long()


def sizes_from_cuts(cuts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Step sizes from sorted interior cut points in ``1..num_tokens-1``."""
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([num_tokens])])
    return bounds.diff()


def random_cuts(num_steps: int, num_tokens: int, generator=None) -> torch.Tensor:
    """``num_steps - 1`` distinct cut points drawn uniformly from ``1..num_tokens-1``, sorted."""
    picks = torch.randperm(num_tokens - 1, generator=generator)[: num_steps - 1] + 1
    return picks.sort().values


def step_index(sizes: torch.Tensor) -> torch.Tensor:
    """The AR step of each position for one split: ``(S,)`` sizes -> ``(L,)``."""
    return torch.repeat_interleave(torch.arange(sizes.numel()), sizes)


def draw_steps(
    schedule: Schedule,
    num_tokens: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> torch.Tensor:
    """Per-position AR step ``(batch_size, L)``; one split for the batch unless ``per_sample``."""
    draws = batch_size if per_sample else 1
    rows = [
        step_index(check_step_sizes(schedule(num_tokens, generator), num_tokens))
        for _ in range(draws)
    ]
    return torch.stack(rows).expand(batch_size, -1).contiguous()


def sizes_of(step: torch.Tensor) -> torch.Tensor:
    """Step sizes of one row of per-position steps ``(L,)`` -> ``(S,)``."""
    return torch.bincount(step)


def step_start(step: torch.Tensor) -> torch.Tensor:
    """Tokens before the step of each position, ``(..., L)``: start(s) of the paper."""
    positions = torch.arange(step.shape[-1]).expand_as(step)
    is_start = torch.ones_like(step, dtype=torch.bool)
    is_start[..., 1:] = step[..., 1:] != step[..., :-1]
    return torch.where(is_start, positions, 0).cummax(dim=-1).values
