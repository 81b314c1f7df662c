"""Built-in timestep samplers: shared across AR steps, or independent per AR step."""

from __future__ import annotations

import torch

from cfkit import hookimpl


class Shared:
    """One t per sample and copy, shared by all its AR steps (the reference)."""

    def __call__(self, batch_size, num_steps, copies, num_timesteps, generator=None):
        t = torch.randint(0, num_timesteps, (batch_size, copies, 1), generator=generator)
        return t.expand(-1, -1, num_steps).contiguous()


class PerStep:
    """An independent t for every AR step (and copy)."""

    def __call__(self, batch_size, num_steps, copies, num_timesteps, generator=None):
        return torch.randint(0, num_timesteps, (batch_size, copies, num_steps), generator=generator)


@hookimpl
def register_timestep_samplers(register):
    register("shared", Shared)
    register("per-step", PerStep)
