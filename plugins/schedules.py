"""Built-in factorisation schedules: fixed, uniform, exp-decay and explicit."""

from __future__ import annotations

import torch

from cfkit import hookimpl
from cfkit.schedules import check_step_sizes, equal_split, random_cuts, sizes_from_cuts


class Fixed:
    """Exactly ``steps`` AR steps, sizes as equal as possible (larger steps first)."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"fixed: steps must be >= 1, got {steps}")
        self.steps = steps

    def __call__(self, num_tokens, generator=None):
        if self.steps > num_tokens:
            raise ValueError(f"fixed: {self.steps} steps cannot split L={num_tokens} tokens")
        return equal_split(num_tokens, self.steps)


class ExpDecay:
    """P(S=k) ∝ gamma^(k-1) for k = 1..L; S-1 distinct cut points uniform in 1..L-1.

    gamma = 1 is uniform over S, gamma = 0 always gives S = 1 (In-context DiT). This is the
    reference's random AR-step sampler.
    """

    def __init__(self, gamma: float = 0.9):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"exp-decay: gamma must be in [0, 1], got {gamma}")
        self.gamma = gamma

    def __call__(self, num_tokens, generator=None):
        k = torch.arange(num_tokens, dtype=torch.float64)
        probs = torch.full_like(k, self.gamma).pow(k)  # 0**0 == 1: gamma=0 gives S=1
        num_steps = int(torch.multinomial(probs, 1, generator=generator)) + 1
        return sizes_from_cuts(random_cuts(num_steps, num_tokens, generator), num_tokens)


class Uniform(ExpDecay):
    """S uniform in 1..L (exp-decay with gamma = 1)."""

    def __init__(self):
        super().__init__(gamma=1.0)


class Explicit:
    """A given list of step sizes."""

    def __init__(self, sizes: list[int]):
        self.sizes = torch.as_tensor(sizes, dtype=torch.long)

    def __call__(self, num_tokens, generator=None):
        return check_step_sizes(self.sizes, num_tokens)


@hookimpl
def register_schedules(register):
    register("fixed", Fixed)
    register("uniform", Uniform)
    register("exp-decay", ExpDecay)
    register("explicit", Explicit)
