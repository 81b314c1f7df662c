"""Loss weightings: AR-axis weights decay along the steps; the loss weight is a product."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import splits

import cfkit
from cfkit.diffusion import GaussianDiffusion
from cfkit.schedules import step_index, step_start
from cfkit.weightings import loss_weights, supports

step_sizes = st.lists(st.integers(1, 8), min_size=1, max_size=16)


@st.composite
def weight_bounds(draw):
    low = draw(st.floats(0.0, 4.0, allow_nan=False))
    return low + draw(st.floats(0.0, 4.0, allow_nan=False)), low


def starts(sizes):
    return step_start(step_index(torch.tensor(sizes)))


@given(st.sampled_from(["linear", "cosine"]), step_sizes, weight_bounds())
def test_ar_weights_are_non_increasing_in_step_order_and_within_bounds(name, sizes, bounds):
    w_max, w_min = bounds
    weighting = cfkit.build("weightings", name, w_max=w_max, w_min=w_min)
    weights = weighting.ar(starts(sizes), sum(sizes))
    assert weights.dtype == torch.float64 and weights.shape == (sum(sizes),)
    assert bool((weights.diff() <= 1e-12).all())
    assert bool((weights >= w_min - 1e-12).all()) and bool((weights <= w_max + 1e-12).all())
    assert weights[0].item() == pytest.approx(w_max, abs=1e-12)  # the first step has start 0


@given(step_sizes, st.floats(-3.0, 3.0, allow_nan=False), st.integers(1, 999))
def test_constant_weighting_is_constant(sizes, value, t):
    weighting = cfkit.build("weightings", "constant", value=value)
    assert weighting.ar(starts(sizes), sum(sizes)).tolist() == [value] * sum(sizes)
    abar = GaussianDiffusion.named("linear", 1000).alphas_cumprod
    assert weighting.diffusion(torch.full((2, 3), t), abar).tolist() == [[value] * 3] * 2


def test_linear_and_cosine_weights_follow_the_paper_formula():
    start = starts([1, 3, 4])  # starts 0, 1, 1, 1, 4, 4, 4, 4 of L = 8
    linear = cfkit.build("weightings", "linear", w_max=2.0, w_min=1.0).ar(start, 8)
    assert linear.tolist() == [2.0] + [1.875] * 3 + [1.5] * 4
    cosine = cfkit.build("weightings", "cosine", w_max=3.0, w_min=1.0).ar(start, 8)
    expected = [math.cos(math.pi * s / 8) + 2.0 for s in start.tolist()]
    assert cosine.tolist() == pytest.approx(expected, abs=1e-12)


def test_min_snr_is_min_of_snr_and_gamma_over_snr():
    abar = GaussianDiffusion.named("linear", 1000).alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    snr = abar[t] / (1 - abar[t])
    got = cfkit.build("weightings", "min-snr", gamma=5.0).diffusion(t, abar)
    torch.testing.assert_close(got, snr.clamp(max=5.0) / snr)
    assert got[0].item() < 1.0 and got[-1].item() == 1.0


@given(st.integers(1, 24), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from(["linear", "cosine"]), st.integers(0, 2**32 - 1), st.data())
def test_loss_weights_multiply_ar_and_diffusion_weights(num_tokens, batch, copies, ar_name, seed,
                                                        data):
    rows = [data.draw(splits(num_tokens)) for _ in range(batch)]
    step_start_ = torch.stack([starts(r) for r in rows]).unsqueeze(1)  # (B, 1, L)
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (batch, copies, num_tokens), generator=generator)
    abar = GaussianDiffusion.named("linear", 1000).alphas_cumprod
    ar = cfkit.build("weightings", ar_name, w_max=2.5, w_min=0.5)
    diffusion = cfkit.build("weightings", "min-snr", gamma=2.0)
    weights = loss_weights(step_start_, t, num_tokens, abar, ar, diffusion)
    assert weights.shape == t.shape and weights.dtype == torch.float64
    expected = ar.ar(step_start_, num_tokens) * diffusion.diffusion(t, abar)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    only_ar = loss_weights(step_start_, t, num_tokens, abar, ar_weighting=ar)
    torch.testing.assert_close(only_ar, ar.ar(step_start_, num_tokens).expand_as(t), rtol=0, atol=0)
    assert bool((loss_weights(step_start_, t, num_tokens, abar) == 1).all())


@pytest.mark.parametrize("name, axes", [
    ("linear", {"ar"}), ("cosine", {"ar"}), ("constant", {"ar", "diffusion"}),
    ("min-snr", {"diffusion"}),
])
def test_weightings_declare_their_axes(name, axes):
    weighting = cfkit.build("weightings", name)
    assert {axis for axis in ("ar", "diffusion") if supports(weighting, axis)} == axes


@pytest.mark.parametrize("name, options", [
    ("linear", {"w_max": 1.0, "w_min": 2.0}), ("cosine", {"w_max": 0.0, "w_min": 0.5}),
    ("min-snr", {"gamma": 0.0}),
])
def test_invalid_weighting_options_raise_value_error(name, options):
    with pytest.raises(ValueError):
        cfkit.build("weightings", name, **options)
