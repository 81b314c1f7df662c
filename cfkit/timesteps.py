"""Training timestep samplers: a diffusion timestep per (sample, noised copy, AR step).

A sampler is called as ``sampler(batch_size, num_steps, copies, num_timesteps, generator)``
and returns a LongTensor ``(batch_size, copies, num_steps)`` of timesteps in
``[0, num_timesteps)``. With ``copies = K > 1`` each AR step is noised K times and all copies
share one clean context (paper appendix B).
"""

from __future__ import annotations

from typing import Protocol

import torch


class TimestepSampler(Protocol):
    def __call__(
        self,
        batch_size: int,
        num_steps: int,
        copies: int,
        num_timesteps: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...


def per_token(t: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Timesteps per noisy token: ``t`` ``(B, K, S)`` and ``step`` ``(B, L)`` -> ``(B, K, L)``."""
    index = step.unsqueeze(1).expand(-1, t.shape[1], -1)
    return torch.gather(t, 2, index)
