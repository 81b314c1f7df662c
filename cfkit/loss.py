"""The diffusion training loss every method shares (ADM's ``training_losses``).

A method brings its network and, for the dual factorisation, its plan; the engine draws the
noise for the global batch, corrupts the tokens with ``q_sample``, builds the regression target
of the chosen parameterisation and takes the squared error weighted along the AR axis and
the diffusion axis. CausalFusion, In-context DiT, DiT, the multimodal methods and Transfusion
all train through ``DiffusionLoss``.
"""

from __future__ import annotations

import torch

from cfkit.diffusion import GaussianDiffusion
from cfkit.methods import Batch, LossOutput
from cfkit.weightings import loss_weights


def global_randn(batch: Batch, shape: tuple[int, ...], generator: torch.Generator | None,
                 device) -> torch.Tensor:
    """Standard normal noise ``(N, *shape)`` drawn for the global batch (``batch.total`` rows)
    and taken at this batch's rows, so any number of processes sees the noise of one."""
    return torch.randn((batch.total, *shape), generator=generator)[batch.rows].to(device)


class DiffusionLoss:
    """q_sample, the target and the weighted MSE of one diffusion: ``prediction`` is the
    network's parameterisation (eps, x0 or v); ``ar_weighting`` and ``diffusion_weighting``
    weight each token's squared error (either may be None: weight 1)."""

    def __init__(self, diffusion: GaussianDiffusion, prediction: str, diffusion_weighting=None,
                 ar_weighting=None):
        self.diffusion = diffusion
        self.prediction = prediction
        self.diffusion_weighting = diffusion_weighting
        self.ar_weighting = ar_weighting

    def uniform_t(self, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """One timestep per image ``(N,)``, uniform over the diffusion's steps, drawn for the
        global batch."""
        return torch.randint(0, self.diffusion.num_timesteps, (batch.total,), generator=generator)[batch.rows]

    def network_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the network is conditioned on (the original 1000-step index)."""
        return self.diffusion.timestep_map.to(t.device)[t]

    def corrupt(self, x_start: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t = q_sample(x_start, t, noise)`` and the regression target; ``t`` broadcasts
        against the leading dims of ``x_start``."""
        x_t = self.diffusion.q_sample(x_start, t, noise)
        return x_t, self.diffusion.target(self.prediction, x_start, t, noise)

    def __call__(self, out: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                 step_start: torch.Tensor, num_tokens: int, plan=None) -> LossOutput:
        """The weighted squared error of ``out`` ``(N, K, L, d)`` against ``target``:
        ``per_token`` ``(N, K, L)`` the unweighted mean over token values, each token weighted
        by the AR weight of its step start (``step_start`` broadcasting against ``(N, K, L)``)
        times the diffusion weight of its timestep ``t``."""
        per_token = (target - out.float()).pow(2).mean(-1)
        weights = loss_weights(
            step_start, t.cpu(), num_tokens, self.diffusion.alphas_cumprod,
            self.ar_weighting, self.diffusion_weighting,
        ).to(per_token.device, per_token.dtype)
        return LossOutput((per_token * weights).mean(), per_token.detach(), plan)
