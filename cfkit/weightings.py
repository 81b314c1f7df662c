"""Loss weightings along the two axes of the dual factorisation.

An AR-axis weighting has ``ar(step_start, num_tokens)``: ``step_start`` ``(..., L)`` is the
number of tokens before each token's AR step (start(s) in the paper); it returns float64
weights of the same shape. A diffusion-axis weighting has ``diffusion(t, alphas_cumprod)``:
weights for timesteps ``t`` given the schedule's ᾱ. A weighting may provide either or both;
the loss weight of a token is the product of the two.
"""

from __future__ import annotations

import torch


def supports(weighting, axis: str) -> bool:
    """Whether ``weighting`` provides the ``axis`` ("ar" or "diffusion") weights."""
    return callable(getattr(weighting, axis, None))


def loss_weights(
    step_start: torch.Tensor,
    t: torch.Tensor,
    num_tokens: int,
    alphas_cumprod: torch.Tensor,
    ar_weighting=None,
    diffusion_weighting=None,
) -> torch.Tensor:
    """Per-token loss weight: AR weight times diffusion weight, both optional. Shapes broadcast
    between ``step_start`` ``(..., L)`` and per-token ``t`` ``(..., L)``."""
    weight = torch.ones(torch.broadcast_shapes(step_start.shape, t.shape), dtype=torch.float64)
    if ar_weighting is not None:
        weight = weight * ar_weighting.ar(step_start, num_tokens)
    if diffusion_weighting is not None:
        weight = weight * diffusion_weighting.diffusion(t, alphas_cumprod)
    return weight
