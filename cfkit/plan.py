"""A training plan: token order, AR step of each position and timesteps, for one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfkit import masks, schedules, timesteps
from cfkit.orderings import check_order


@dataclass(frozen=True)
class Plan:
    """``order`` ``(B, L)`` raster index at each position; ``step`` ``(B, L)`` AR step of each
    position (non-decreasing); ``t`` ``(B, K, S_max)`` timestep per noised copy and AR step."""

    order: torch.Tensor
    step: torch.Tensor
    t: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.step.shape[1]

    @property
    def copies(self) -> int:
        return self.t.shape[1]

    @property
    def num_steps(self) -> torch.Tensor:
        """``(B,)`` number of AR steps of each sample."""
        return self.step[:, -1] + 1

    @property
    def shared_split(self) -> bool:
        """Whether every sample has the same split (then the reference layout applies)."""
        return bool((self.step == self.step[:1]).all())

    def step_start(self) -> torch.Tensor:
        """``(B, L)`` tokens before each position's AR step."""
        return schedules.step_start(self.step)

    def t_per_token(self) -> torch.Tensor:
        """``(B, K, L)`` timestep of each noisy token."""
        return timesteps.per_token(self.t, self.step)

    def layout(self, cond_len: int) -> masks.Layout:
        """Sequence layout ``(B, T)``. A shared split drops the last step's clean tokens as
        the reference does; per-sample splits keep all L clean tokens so T is common."""
        clean_len = None if self.shared_split else self.num_tokens
        return masks.batch_layout(cond_len, self.step, self.copies, clean_len)


class Planner:
    """Draws plans from a schedule, an ordering (named ``ordering_name`` in errors) and a
    timestep sampler; the plugins' outputs are checked on every draw."""

    def __init__(self, schedule, ordering, timestep_sampler, copies=1, per_sample=False,
                 ordering_name=None):
        self.schedule = schedule
        self.ordering = ordering
        self.ordering_name = ordering if ordering_name is None else ordering_name
        self.timestep_sampler = timestep_sampler
        self.copies = copies
        self.per_sample = per_sample

    def draw(self, batch_size: int, grid: tuple[int, int], num_timesteps: int,
             generator: torch.Generator | None = None) -> Plan:
        num_tokens = grid[0] * grid[1]
        order = check_order(self.ordering(batch_size, grid, generator), batch_size, grid,
                            self.ordering_name)
        step = schedules.draw_steps(
            self.schedule, num_tokens, batch_size, generator, self.per_sample
        )
        max_steps = int(step[:, -1].max()) + 1
        t = self.timestep_sampler(batch_size, max_steps, self.copies, num_timesteps, generator)
        return Plan(order, step, t)
