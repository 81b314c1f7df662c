"""cfkit.flops: the counted training FLOPs of benchmarks/perf and cfkit bench."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cfkit import config as configs
from cfkit.flops import step_flops, training_flops
from cfkit.plan import Plan

BASE = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "digits-tiny.toml"


def test_step_flops_counts_the_block_matmuls_forward_and_backward():
    dense = 3 * 3 * (2 * 2 * 10 * (4 + 2 * 4.0) * 8**2 + 4 * 2 * 10**2 * 8)
    assert step_flops(2, 10, 8, 3, 4.0) == dense
    assert step_flops(2, 10, 8, 3, 4.0, attention_pairs=40) == dense - 3 * 3 * 4 * 2 * 60 * 8


def test_dit_counts_its_image_tokens_with_full_attention():
    experiment = configs.load(BASE, ["method.name=dit", "model.preset=DiT-tiny", "train.max_steps=10"])
    counted = training_flops(experiment, draws=2)
    assert (counted.sequence_length, counted.attention, counted.steps) == (64, "dense", 10)
    assert counted.per_step == step_flops(32, 64, 64, 4, 4.0)
    assert counted.total == 10 * counted.per_step


def test_incontext_dit_counts_the_condition_tokens_and_the_pairs_its_mask_allows():
    experiment = configs.load(BASE, ["method.name=incontext-dit"])
    counted = training_flops(experiment, draws=2)
    one_step = torch.zeros(1, 64, dtype=torch.long)  # every token in AR step 0
    plan = Plan(torch.arange(64)[None], one_step, torch.zeros(1, 1, 1, dtype=torch.long))
    pairs = float(plan.layout(4).dense()[0].sum())
    assert (counted.sequence_length, counted.attention) == (4 + 64, "mask") and pairs < 68**2
    assert counted.per_step == pytest.approx(step_flops(32, 68, 64, 4, 4.0, pairs))


def test_the_causalfusion_count_is_the_same_for_every_seed_and_grows_with_copies():
    one, other = (training_flops(configs.load(BASE, [f"seed={seed}"]), draws=4) for seed in (0, 5))
    assert one == other and one.attention == "mask" and 4 + 64 < one.sequence_length < 4 + 2 * 64
    copies = training_flops(configs.load(BASE, ["factorisation.copies=4"]), draws=4)
    assert copies.per_step > 2 * one.per_step
