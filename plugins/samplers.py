"""Built-in diffusion samplers: DDPM (ancestral, the reference), DDIM and DPM-Solver++."""

from __future__ import annotations

import torch

from cfkit import hookimpl
from cfkit.diffusion import VARIANCES
from cfkit.samplers import noise_like, nonzero


class DDPM:
    """Ancestral sampling (Ho et al. 2020): x_{t-1} = μ_θ(x_t, t) + σ_t z with σ_t² = β_t
    ("fixed-large", the reference) or the posterior variance β̃_t ("fixed-small")."""

    def __init__(self, variance: str = "fixed-large"):
        if variance not in VARIANCES:
            raise ValueError(f"ddpm: unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
        self.variance = variance

    def step(self, diffusion, output, x_t, t, prediction="eps", generator=None):
        mean, log_variance, _ = diffusion.p_mean_variance(output, x_t, t, prediction, self.variance)
        noise = noise_like(x_t, generator)
        return mean + nonzero(t, x_t.dim()) * (0.5 * log_variance).exp() * noise


class DDIM:
    """Song et al. 2021: deterministic at ``eta`` 0; ``eta`` 1 has the DDPM posterior variance."""

    def __init__(self, eta: float = 0.0):
        if eta < 0:
            raise ValueError(f"ddim: eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def step(self, diffusion, output, x_t, t, prediction="eps", generator=None):
        mean, sigma, _ = diffusion.ddim_mean_and_sigma(output, x_t, t, prediction, self.eta)
        if self.eta == 0:
            return mean
        return mean + sigma * noise_like(x_t, generator)  # σ is 0 at t = 0


class DPMSolverPP:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models"): deterministic, second order by reusing the x̂_0 of the
    step before, for sampling in ~20 steps. A reverse process's first step and its last (to
    σ = 0) are first order, as in diffusers' ``DPMSolverMultistepScheduler``.

    The sampler keeps its last step's x̂_0 and uses it only where the next call continues that
    reverse process (the same diffusion and shape, t one lower); any other call starts a new
    one, so each AR step of a generation starts afresh from its noise."""

    def __init__(self):
        self._last = None  # (diffusion, t, x̂_0) of the last step

    def step(self, diffusion, output, x_t, t, prediction="eps", generator=None):
        x0, _ = diffusion.xstart_and_eps(prediction, x_t, t, output)
        previous = self._previous_x0(diffusion, x0, t)
        self._last = (diffusion, t, x0)
        return diffusion.dpm_solver_step(x_t, t, x0, previous)

    def _previous_x0(self, diffusion, x0, t):
        """The last step's x̂_0 in the rows this step continues (t one lower), ``x0`` itself
        (no second-order term) in the others; None when no row continues it."""
        if self._last is None:
            return None
        last_diffusion, last_t, last_x0 = self._last
        if last_diffusion is not diffusion or last_x0.shape != x0.shape:
            return None
        # Compared on the device: no host sync per diffusion step.
        continues = (last_t == t + 1).reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
        return torch.where(continues, last_x0, x0)


@hookimpl
def register_samplers(register):
    register("ddpm", DDPM)
    register("ddim", DDIM)
    register("dpm-solver++", DPMSolverPP)


@hookimpl
def register_defaults(register):
    """Generation samples with DDPM, the reference sampler (``cfkit sample``, the bench)."""
    register("sampling.sampler", "ddpm")
