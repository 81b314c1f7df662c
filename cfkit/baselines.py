"""Trivial samplers, scored with the same metrics as the models (``evaluate.score_samples``
with ``EvalContext.for_experiment``), so that an image report can say what a score means:

- ``real-train``: a random train image of the requested class (the floor: real images);
- ``independent-pixels``: every pixel and channel drawn independently from its histogram over
  the class's train images (no structure beyond per-pixel statistics);
- ``context-blind-ar``: the token grid split into ``ar_steps`` equal AR steps in a random
  order, each step's tokens copied from a different random train image of the class (an AR
  sampler that ignores the earlier steps).

Each sampler draws class-balanced labels ``0, 1, ..., K-1, 0, ...`` (those of
``evaluate.sample``) from the dataset's train split, with randomness from one generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfkit.evaluate import SampleSet
from cfkit.metrics import dataset_images
from cfkit.orderings import random_order
from cfkit.schedules import equal_split, step_index
from cfkit.transformer import patchify, unpatchify

BASELINES = ("real-train", "independent-pixels", "context-blind-ar")


def baseline_samples(name: str, dataset, num: int, *, ar_steps: int = 8, patch_size: int = 1,
                     seed: int = 0) -> SampleSet:
    """``num`` uint8 images ``(N, C, H, W)`` of baseline ``name`` from the train split of the
    built ``dataset``, for labels ``arange(num) % num_classes``. ``ar_steps`` and
    ``patch_size`` apply to ``context-blind-ar``, whose set has ``ar_steps``; the others'
    have None (they are not AR samplers)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
    train, train_labels = dataset_images(dataset, "train")
    labels = torch.arange(num) % dataset.num_classes
    generator = torch.Generator().manual_seed(seed)
    members = ClassMembers.of(train_labels, dataset.num_classes)
    if name == "real-train":
        return SampleSet(train[members.draw(labels, (), generator)], labels, None)
    if name == "independent-pixels":
        return SampleSet(independent_pixels(train, members, labels, generator), labels, None)
    images, _, _ = context_blind_ar(train, members, labels, generator, ar_steps, patch_size)
    return SampleSet(images, labels, ar_steps)


@dataclass(frozen=True)
class ClassMembers:
    """The train indices of each class: ``table`` ``(K, M)`` (row k's first ``counts[k]``
    entries are class k's images, the rest padding) and ``counts`` ``(K,)``."""

    table: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, labels: torch.Tensor, num_classes: int) -> ClassMembers:
        counts = torch.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes]
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"class(es) {empty} have no train images to draw from")
        start = counts.cumsum(0) - counts
        ranks = (start[:, None] + torch.arange(int(counts.max()))).clamp(max=len(labels) - 1)
        by_class = torch.argsort(torch.where(labels >= 0, labels, num_classes), stable=True)
        return cls(by_class[ranks], counts)

    def draw(self, labels: torch.Tensor, shape: tuple, generator: torch.Generator) -> torch.Tensor:
        """A uniformly random member of each label's class, independently for every entry of
        ``(N, *shape)``."""
        counts = self.counts[labels].view(-1, *([1] * len(shape)))
        rank = (torch.rand(len(labels), *shape, generator=generator) * counts).long()
        return self.table[labels.view(-1, *([1] * len(shape))), rank]

    def draw_distinct(self, labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """``(N, k)``: k different random members of each label's class."""
        fewest = int(self.counts[labels].min())
        if k > fewest:
            raise ValueError(f"cannot draw {k} different train images from a class of {fewest}")
        keys = torch.rand(len(labels), self.table.shape[1], generator=generator)
        keys[torch.arange(self.table.shape[1]) >= self.counts[labels][:, None]] = 2  # padding last
        return self.table[labels[:, None], keys.argsort(dim=1)[:, :k]]


def independent_pixels(train: torch.Tensor, members: ClassMembers, labels: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    """uint8 ``(N, C, H, W)``: each value that of the same pixel and channel of a random train
    image of the class, independently (a draw from that pixel's class histogram)."""
    flat = train.flatten(1)  # (M, C*H*W)
    source = members.draw(labels, (flat.shape[1],), generator)  # (N, C*H*W)
    return flat[source, torch.arange(flat.shape[1])].view(len(labels), *train.shape[1:])


def context_blind_ar(train: torch.Tensor, members: ClassMembers, labels: torch.Tensor,
                     generator: torch.Generator, ar_steps: int, patch_size: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, C, H, W)``, the AR step of each raster token ``(N, L)`` and the
    train image each step is copied from ``(N, ar_steps)``: the ``patch_size`` token grid
    split into ``ar_steps`` equal steps in a random order, each step a different train image of
    the class."""
    channels, height, width = train.shape[1:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the {height}x{width} images")
    grid = (height // patch_size, width // patch_size)
    length = grid[0] * grid[1]
    order = random_order(len(labels), length, generator)  # (N, L)
    position_step = step_index(equal_split(length, ar_steps))
    step = torch.empty_like(order).scatter_(1, order, position_step.expand_as(order).contiguous())
    sources = members.draw_distinct(labels, ar_steps, generator)  # (N, S)
    tokens = patchify(train, patch_size)  # (M, L, d)
    copied = tokens[torch.gather(sources, 1, step), torch.arange(length)]  # (N, L, d)
    return unpatchify(copied, patch_size, channels), step, sources
