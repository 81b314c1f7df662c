"""Gaussian diffusion maths (DDPM/ADM conventions).

All schedule arithmetic is precomputed once in float64; ``extract`` indexes it per batch.
Timesteps index the (possibly respaced) schedule; ``timestep_map`` gives the original
1000-step index the network is conditioned on.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed-large", "fixed-small")
BETA_SCHEDULES = ("linear", "cosine")
STRIDED = "ddim"  # ADM's respacing "ddimN": exactly N equally strided steps


def beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """Betas ``(T,)`` float64: ``linear`` (DDPM, 1e-4 to 0.02 scaled to T) or ``cosine``."""
    if name == "linear":
        if num_timesteps <= 20:
            raise ValueError(f"the linear β schedule (1e-4 to 0.02, scaled by 1000/T) needs "
                             f"num_timesteps > 20, got {num_timesteps}")
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":

        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_timesteps)
        ratios = [abar((i + 1) / num_timesteps) / abar(i / num_timesteps) for i in steps]
        return np.minimum(1 - np.array(ratios, dtype=np.float64), 0.999)
    raise ValueError(f"unknown beta schedule {name!r}; allowed: {', '.join(BETA_SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """The kept timesteps of a respacing, sorted (ADM's ``space_timesteps``).

    ``section_counts`` is ``"ddimN"`` (a constant stride giving exactly N steps), a comma list
    such as ``"10,15,20"`` (that many evenly spaced steps in each equal section), an int, or a
    list of ints.
    """
    if isinstance(section_counts, str) and section_counts.startswith(STRIDED):
        desired = int(section_counts[len(STRIDED):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {desired} equally strided steps of {num_timesteps}")
    if isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def extract(arr: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``arr[t]`` as float32, shaped to broadcast against a tensor of ``ndim`` dims."""
    out = arr.to(t.device)[t].float()
    return out.reshape(*t.shape, *([1] * (ndim - t.dim())))


def dpm_solver_coefficients(abar: np.ndarray, abar_prev: np.ndarray) -> dict[str, np.ndarray]:
    """The DPM-Solver++(2M) step of each t, from ᾱ_t and ᾱ_{t-1} ``(T,)`` (Lu et al. 2022,
    with α = sqrt(ᾱ), σ = sqrt(1 - ᾱ), λ = log(α / σ) and h_t = λ_{t-1} - λ_t):
    x_{t-1} = σ_{t-1}/σ_t x_t + α_{t-1} (1 - e^{-h_t}) x̂_0 + α_{t-1} (1 - e^{-h_t}) h_t / (2 h_{t+1})
    (x̂_0 - x̂_0 at t+1). The last term is 0 at t = T-1 (no earlier step) and at t = 0, whose
    σ_{-1} = 0 makes h infinite (there the first-order step returns x̂_0 itself)."""
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    alpha_prev, sigma_prev = np.sqrt(abar_prev), np.sqrt(1.0 - abar_prev)
    # α_{t-1} (1 - e^{-h}) without h: e^{-h} = α_t σ_{t-1} / (σ_t α_{t-1}) is finite at t = 0.
    x0_coef = alpha_prev - alpha * sigma_prev / sigma
    log_snr = np.log(alpha) - np.log(sigma)
    h = (np.log(alpha_prev[1:]) - np.log(sigma_prev[1:])) - log_snr[1:]  # h_t for t >= 1
    second = np.zeros_like(abar)
    second[1:-1] = 0.5 * x0_coef[1:-1] * h[:-1] / h[1:]
    return {"dpm_solver_x_coef": sigma_prev / sigma, "dpm_solver_x0_coef": x0_coef,
            "dpm_solver_second_coef": second}


class GaussianDiffusion:
    """The forward process q and the posterior/model-mean maths of DDPM."""

    def __init__(self, betas, timestep_map=None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = torch.as_tensor(
            np.arange(len(betas)) if timestep_map is None else timestep_map, dtype=torch.long
        )
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # t = 0's posterior variance is 0; its log uses t = 1's (β_0 when there is no t = 1).
        first_variance = posterior_variance[1] if len(betas) > 1 else betas[0]
        arrays = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
            "posterior_variance": posterior_variance,
            # log of the posterior variance with the t=0 entry (0) replaced by t=1's.
            "posterior_log_variance_clipped": np.log(
                np.append(first_variance, posterior_variance[1:])
            ),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            # "fixed large": betas, with the first entry the posterior variance at t=1.
            "fixed_large_log_variance": np.log(np.append(first_variance, betas[1:])),
            **dpm_solver_coefficients(abar, abar_prev),
        }
        for name, value in arrays.items():
            setattr(self, name, torch.from_numpy(value))

    @classmethod
    def named(cls, schedule: str = "linear", num_timesteps: int = 1000, respacing=None):
        """A diffusion from a named beta schedule, optionally respaced (see ``respace``)."""
        diffusion = cls(beta_schedule(schedule, num_timesteps))
        return diffusion if respacing in (None, "") else diffusion.respace(respacing)

    def respace(self, section_counts) -> GaussianDiffusion:
        """The diffusion over a subset of steps with ᾱ kept at the kept steps."""
        kept = space_timesteps(self.num_timesteps, section_counts)
        abar = self.alphas_cumprod.numpy()[kept]
        betas = 1 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.timestep_map[kept])

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
        n = x_start.dim()
        return (
            extract(self.sqrt_alphas_cumprod, t, n) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, n) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.dim()
        mean = (
            extract(self.posterior_mean_coef1, t, n) * x_start
            + extract(self.posterior_mean_coef2, t, n) * x_t
        )
        return (
            mean,
            extract(self.posterior_variance, t, n),
            extract(self.posterior_log_variance_clipped, t, n),
        )

    def predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.dim()
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, n) * eps
        )

    def predict_eps_from_xstart(self, x_t, t, x_start):
        n = x_t.dim()
        return (extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - x_start) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, n
        )

    def v_target(self, x_start, t, noise):
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0."""
        n = x_start.dim()
        return (
            extract(self.sqrt_alphas_cumprod, t, n) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, n) * x_start
        )

    def predict_xstart_from_v(self, x_t, t, v):
        n = x_t.dim()
        return (
            extract(self.sqrt_alphas_cumprod, t, n) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, n) * v
        )

    def target(self, prediction: str, x_start, t, noise):
        """The regression target of a network predicting ``prediction`` (eps, x0 or v)."""
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x_start
        if prediction == "v":
            return self.v_target(x_start, t, noise)
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")

    def xstart_and_eps(self, prediction: str, x_t, t, output):
        """(x̂_0, ε̂) from a network output of kind ``prediction``."""
        if prediction == "eps":
            return self.predict_xstart_from_eps(x_t, t, output), output
        if prediction == "x0":
            x0 = output
        elif prediction == "v":
            x0 = self.predict_xstart_from_v(x_t, t, output)
        else:
            raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        return x0, self.predict_eps_from_xstart(x_t, t, x0)

    def p_mean_variance(self, output, x_t, t, prediction="eps", variance="fixed-large",
                        clip_denoised=False):
        """Mean and log-variance of p(x_{t-1} | x_t) and x̂_0, from a network output."""
        x0, _ = self.xstart_and_eps(prediction, x_t, t, output)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, log_small = self.q_posterior_mean_variance(x0, x_t, t)
        if variance == "fixed-large":
            log_variance = extract(self.fixed_large_log_variance, t, x_t.dim())
        elif variance == "fixed-small":
            log_variance = log_small
        else:
            raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
        return mean, log_variance.expand_as(mean), x0

    def ddim_mean_and_sigma(self, output, x_t, t, prediction="eps", eta=0.0):
        """Mean and σ of the DDIM step (Song et al. 2021, eq. 12 and 16) and x̂_0:
        x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ²) ε̂ + σ z with
        σ = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1}); σ is 0 at t = 0."""
        x0, eps = self.xstart_and_eps(prediction, x_t, t, output)
        n = x_t.dim()
        abar, abar_prev = extract(self.alphas_cumprod, t, n), extract(self.alphas_cumprod_prev, t, n)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps
        return mean, sigma, x0

    def dpm_solver_step(self, x_t, t, x0, previous_x0=None):
        """x_{t-1} of DPM-Solver++ (Lu et al. 2022; see ``dpm_solver_coefficients``) from x_t
        ``(N, ...)`` and its x̂_0: second-order multistep (2M) given ``previous_x0``, the x̂_0
        of the step before (at t + 1), else first order, which is DDIM with η = 0."""
        n = x_t.dim()
        x = extract(self.dpm_solver_x_coef, t, n) * x_t + extract(self.dpm_solver_x0_coef, t, n) * x0
        if previous_x0 is None:
            return x
        return x + extract(self.dpm_solver_second_coef, t, n) * (x0 - previous_x0)
