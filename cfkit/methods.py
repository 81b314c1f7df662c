"""The method interface: a network plus the loss that trains it on a batch.

A method plugin registers a factory ``factory(experiment) -> Method`` where ``experiment``
is the validated ``cfkit.config.Experiment``. The factory may also offer
``factory.check(experiment)`` to validate method-specific options early (config validation).

``loss(batch, generator, model=None)`` runs the forward pass through ``model`` when given (a
DDP/FSDP/compiled wrapper of ``method.model``). Randomness is drawn for the global batch
(``batch.global_size`` rows) and the batch's rows (from ``batch.offset``) are used, so that
any number of processes computes the same loss as one.

A method and its network declare what they can do as ``capabilities``, a frozenset of the
names below, on the class (or on the factory function); the core asks ``can(obj, name)``
instead of probing for attributes:

- ``SAMPLING`` (method): a diffusion network over a token grid, ``method.diffusion`` and
  ``method.model.config.grid``: ``cfkit.pipeline.Pipeline`` samples it.
- ``AR_PLANS`` (method): trains on plans drawn by ``method.planner`` (AR-step schedule and
  ordering); its factory offers ``network_config(experiment)``.
- ``NOISE_PREDICTION`` (method): offers ``predict_noise(latents, labels, plan, noise)``
  (``NoisePredictor``), which the held-out loss (metric ``heldout-loss``) reads.
- ``CAPTIONING`` (method): ``caption(latents)``.
- ``CAUSAL_GENERATION`` (network): a KV cache and a causal mask (``push_condition``, ...), so it
  generates in any number of AR steps; a network without it denoises the whole image at once.
- ``TEXT_CONDITIONING`` (network and method): conditions on framed caption ids
  (``model.check_text``, ``method.frame(captions)``) instead of class labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class Batch:
    """``latents`` ``(N, C, H, W)`` (tokenizer output, already scaled); ``labels`` ``(N,)``;
    this process's rows start at ``offset`` of a global batch of ``global_size`` rows;
    ``captions`` each row's captions (a list of strings, or None), for methods with text."""

    latents: torch.Tensor
    labels: torch.Tensor
    offset: int = 0
    global_size: int | None = None
    captions: list | None = None

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.latents.shape[0])

    @property
    def total(self) -> int:
        return self.global_size or self.latents.shape[0]


@dataclass
class LossOutput:
    """``loss`` the scalar to minimise; ``per_token`` ``(N, K, L)`` unweighted squared error
    (mean over token values) in generation order; ``plan`` the plan used, if any; ``terms``
    the named parts of ``loss`` (detached), e.g. ``image`` and ``caption``, where it has parts."""

    loss: torch.Tensor
    per_token: torch.Tensor
    plan: Any = None
    terms: dict = field(default_factory=dict)


class Method(Protocol):
    model: nn.Module

    def loss(self, batch: Batch, generator: torch.Generator | None = None,
             model: nn.Module | None = None) -> LossOutput: ...


SAMPLING = "sampling"
AR_PLANS = "ar-plans"
NOISE_PREDICTION = "noise-prediction"
CAPTIONING = "captioning"
CAUSAL_GENERATION = "causal-generation"
TEXT_CONDITIONING = "text-conditioning"
CAPABILITIES = (SAMPLING, AR_PLANS, NOISE_PREDICTION, CAPTIONING, CAUSAL_GENERATION, TEXT_CONDITIONING)


def can(obj, capability: str) -> bool:
    """Whether the method, network or factory ``obj`` declares ``capability`` (one of
    ``CAPABILITIES``); an object that declares nothing can do none of them."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; allowed: {', '.join(CAPABILITIES)}")
    return capability in getattr(obj, "capabilities", frozenset())


class NoisePredictor(Protocol):
    capabilities: frozenset  # holds NOISE_PREDICTION

    def predict_noise(self, latents: torch.Tensor, labels: torch.Tensor, plan,
                      noise: torch.Tensor) -> torch.Tensor:
        """ε̂ ``(N, K, L, d)`` in generation order (``plan.order``) for latents ``(N, C, H, W)``,
        final ``labels`` ``(N,)`` (no CFG dropout) and ``noise`` ``(N, K, L, d)`` in generation
        order: each AR step's tokens noised at its ``plan.t``, seeing the clean tokens of
        earlier steps. A method that denoises the whole image at once takes one AR step."""
        ...


def drop_labels(labels: torch.Tensor, batch: Batch, probability: float, null_class: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """Labels replaced by ``null_class`` with ``probability`` (CFG label dropout), drawn for
    the global batch and taken at this batch's rows."""
    u = torch.rand(batch.total, generator=generator)[batch.rows].to(labels.device)
    return torch.where(u < probability, null_class, labels)
