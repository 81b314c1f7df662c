"""Diffusion samplers: how one reverse step x_t -> x_{t-1} is drawn at generation.

A sampler is built from its options (``cfkit.build("samplers", "ddim", eta=0.5)``) and called
once per diffusion step as ``sampler.step(diffusion, output, x_t, t, prediction, generator)``
over a respaced ``GaussianDiffusion``: ``output`` is the network output of kind ``prediction``
(eps, x0 or v) for ``x_t`` ``(N, ...)`` at respaced indices ``t`` ``(N,)``; it returns x_{t-1}
shaped like ``x_t``, with noise drawn from ``generator`` only and no noise at ``t = 0``.
A multistep sampler may keep what it needs of its earlier steps (e.g. DPM-Solver++'s last x̂_0)
and use it only on the call that continues them (t one lower, same diffusion): generation runs
one reverse process at a time, from ``t = num_timesteps - 1`` down to 0, per AR step.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cfkit.diffusion import GaussianDiffusion, space_timesteps


class Sampler(Protocol):
    def step(self, diffusion: GaussianDiffusion, output: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor, prediction: str = "eps",
             generator: torch.Generator | None = None) -> torch.Tensor: ...


def respaced(diffusion: GaussianDiffusion, steps) -> GaussianDiffusion:
    """``diffusion`` respaced to ``steps``: an int N (N evenly spaced steps), ``"ddimN"``
    (exactly N equally strided steps) or a comma list of counts per equal section
    (``"10,20"``). A ValueError says what is allowed."""
    allowed = "an int N >= 2, 'ddimN' or a comma list of steps per equal section (e.g. '10,20')"
    try:
        kept = space_timesteps(diffusion.num_timesteps, steps)
    except (TypeError, ValueError) as error:
        raise ValueError(f"steps {steps!r}: {error}; allowed: {allowed}") from None
    if len(kept) < 2:  # a one-step diffusion has no posterior at t = 1 to define its variance
        raise ValueError(f"steps {steps!r} keeps {len(kept)} diffusion step; allowed: {allowed}")
    return diffusion.respace(steps)


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped as ``x``, drawn on the CPU from ``generator`` so that a
    seed gives the same draws on every device, then moved to ``x``'s device and dtype."""
    return torch.randn(x.shape, generator=generator).to(x)


def nonzero(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(N, 1, ...)`` float: 0 where ``t == 0`` (the last step adds no noise), else 1."""
    return (t != 0).float().reshape(*t.shape, *([1] * (ndim - t.dim())))
