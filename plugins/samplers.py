"""Built-in diffusion samplers: DDPM (ancestral, the reference) and DDIM."""

from __future__ import annotations

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


@hookimpl
def register_samplers(register):
    register("ddpm", DDPM)
    register("ddim", DDIM)


@hookimpl
def register_defaults(register):
    """Generation samples with DDPM, the reference sampler (``cfkit sample``, the bench)."""
    register("sampling.sampler", "ddpm")
