"""Diffusion samplers: how one reverse step x_t -> x_{t-1} is drawn at generation.

A sampler is built from its options (``cfkit.build("samplers", "ddim", eta=0.5)``) and called
once per diffusion step as ``sampler.step(diffusion, output, x_t, t, prediction, generator)``
over a respaced ``GaussianDiffusion``: ``output`` is the network output of kind ``prediction``
(eps, x0 or v) for ``x_t`` ``(N, ...)`` at respaced indices ``t`` ``(N,)``; it returns x_{t-1}
shaped like ``x_t``, with noise drawn by ``noise_like(x_t, generator)`` only and no noise at
``t = 0``. ``generator`` is a ``torch.Generator`` or ``SampleGenerators``, one per sample.
A multistep sampler may keep what it needs of its earlier steps (e.g. DPM-Solver++'s last x̂_0)
and use it only on the call that continues them (t one lower, same diffusion): generation runs
one reverse process at a time, from ``t = num_timesteps - 1`` down to 0, per AR step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
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


def sample_seed(seed: int, index: int | None = None) -> int:
    """The 64-bit seed of sample ``index`` of a set drawn with ``seed`` (numpy's SeedSequence
    of ``seed`` spawned at ``index``: unrelated streams for neighbouring seeds and indices);
    without ``index``, the seed of the draws the whole set shares."""
    spawn_key = () if index is None else (int(index),)
    return int(np.random.SeedSequence(int(seed), spawn_key=spawn_key).generate_state(1, np.uint64)[0])


class SampleGenerators:
    """One CPU generator per sample, sample ``i`` seeded by ``(seed, i)`` (``sample_seed``),
    so that a sample's draws (its order and noise) do not depend on the batch or the process
    that generates it; ``shared`` is seeded by ``seed`` alone, for the draws every sample of
    the set shares (the AR step sizes of a schedule: a batch generates one split)."""

    def __init__(self, seed: int, indices: Iterable[int]):
        self.rows = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
        self.shared = torch.Generator().manual_seed(sample_seed(seed))

    def __len__(self) -> int:
        return len(self.rows)

    def randn(self, shape) -> torch.Tensor:
        """Standard normal ``shape`` ``(N, ...)`` on the CPU, row i from sample i's generator."""
        if shape[0] != len(self.rows):
            raise ValueError(f"{len(self.rows)} sample generators cannot draw {shape[0]} rows")
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.rows])


def shared_generator(generator: torch.Generator | SampleGenerators | None) -> torch.Generator | None:
    """The generator of draws a whole batch shares: ``generator``, or ``SampleGenerators``'
    ``shared`` one."""
    return generator.shared if isinstance(generator, SampleGenerators) else generator


def noise_like(x: torch.Tensor, generator: torch.Generator | SampleGenerators | None = None) -> torch.Tensor:
    """Standard normal noise shaped as ``x``, drawn on the CPU from ``generator`` (row i from
    sample i's with ``SampleGenerators``) so that a seed gives the same draws on every
    device, then moved to ``x``'s device and dtype."""
    if isinstance(generator, SampleGenerators):
        return generator.randn(x.shape).to(x)
    return torch.randn(x.shape, generator=generator).to(x)


def nonzero(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(N, 1, ...)`` float: 0 where ``t == 0`` (the last step adds no noise), else 1."""
    return (t != 0).float().reshape(*t.shape, *([1] * (ndim - t.dim())))
