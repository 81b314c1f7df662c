"""The method interface: a network plus the loss that trains it on a batch.

A method plugin registers a factory ``factory(experiment) -> Method`` where ``experiment``
is the validated ``cfkit.config.Experiment``. The factory may also offer
``factory.check(experiment)`` to validate method-specific options early (config validation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class Batch:
    """``latents`` ``(N, C, H, W)`` (tokenizer output, already scaled); ``labels`` ``(N,)``."""

    latents: torch.Tensor
    labels: torch.Tensor


@dataclass
class LossOutput:
    """``loss`` the scalar to minimise; ``per_token`` ``(N, K, L)`` unweighted squared error
    (mean over token values) in generation order; ``plan`` the plan used, if any."""

    loss: torch.Tensor
    per_token: torch.Tensor
    plan: Any = None


class Method(Protocol):
    model: nn.Module

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> LossOutput: ...

    def state(self) -> dict:
        """What a checkpoint needs to rebuild the method (JSON-serialisable)."""
        ...
