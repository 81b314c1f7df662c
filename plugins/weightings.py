"""Built-in loss weightings: linear, cosine and constant (AR axis); min-snr (diffusion axis)."""

from __future__ import annotations

import math

import torch

from cfkit import hookimpl


class _ARWeighting:
    def __init__(self, w_max: float = 2.0, w_min: float = 1.0):
        if w_max < w_min:
            raise ValueError(f"{self.name}: w_max ({w_max}) must be >= w_min ({w_min})")
        self.w_max, self.w_min = float(w_max), float(w_min)


class Linear(_ARWeighting):
    """w(s) = w_max - (w_max - w_min) * start(s) / L (the reference default)."""

    name = "linear"

    def ar(self, step_start, num_tokens):
        x = step_start.to(torch.float64)
        return self.w_max - (self.w_max - self.w_min) / num_tokens * x


class Cosine(_ARWeighting):
    """w(s) = (w_max - w_min)/2 * cos(pi * start(s) / L) + (w_max + w_min)/2."""

    name = "cosine"

    def ar(self, step_start, num_tokens):
        x = step_start.to(torch.float64)
        half_range = (self.w_max - self.w_min) / 2
        return torch.cos(math.pi / num_tokens * x) * half_range + (self.w_max + self.w_min) / 2


class Constant:
    """The same weight everywhere, on either axis."""

    def __init__(self, value: float = 1.0):
        self.value = float(value)

    def ar(self, step_start, num_tokens):
        return torch.full(step_start.shape, self.value, dtype=torch.float64)

    def diffusion(self, t, alphas_cumprod):
        return torch.full(t.shape, self.value, dtype=torch.float64)


class MinSNR:
    """Min-SNR-gamma for ε-prediction: min(SNR(t), gamma) / SNR(t) (Hang et al. 2023)."""

    def __init__(self, gamma: float = 5.0):
        if gamma <= 0:
            raise ValueError(f"min-snr: gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def diffusion(self, t, alphas_cumprod):
        abar = alphas_cumprod.to(torch.float64)[t]
        snr = abar / (1 - abar)
        return snr.clamp(max=self.gamma) / snr


@hookimpl
def register_weightings(register):
    register("linear", Linear)
    register("cosine", Cosine)
    register("constant", Constant)
    register("min-snr", MinSNR)
