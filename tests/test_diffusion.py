"""Gaussian diffusion maths: schedules, respacing and the x0/eps/v conversions."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cfkit.diffusion import GaussianDiffusion, beta_schedule, space_timesteps

# The linear schedule scales β to T (ADM): from T = 20 down its last β reaches 1.
linear_lengths = st.integers(50, 2000)
cosine_lengths = st.integers(2, 2000)
schedules = st.one_of(st.tuples(st.just("linear"), linear_lengths),
                      st.tuples(st.just("cosine"), cosine_lengths))


@given(schedules)
def test_alphas_cumprod_strictly_decrease(schedule):
    diffusion = GaussianDiffusion.named(*schedule)
    abar = diffusion.alphas_cumprod.numpy()
    assert abar.dtype == np.float64 and abar.shape == (schedule[1],)
    assert 0 < abar[0] < 1
    assert (np.diff(abar) < 0).all()
    assert abar[-1] >= 0


@pytest.mark.parametrize("num_timesteps", [50, 1000, 4000])
def test_linear_betas_run_from_1e4_to_0_02_scaled_to_T(num_timesteps):
    betas = beta_schedule("linear", num_timesteps)
    scale = 1000 / num_timesteps
    assert betas[0] == pytest.approx(1e-4 * scale) and betas[-1] == pytest.approx(0.02 * scale)
    assert np.allclose(np.diff(betas), np.diff(betas)[0])


@st.composite
def respacings(draw):
    """(base schedule, section string, expected number of kept steps)."""
    name, num_timesteps = draw(schedules)
    kind = draw(st.sampled_from(["ddim", "count", "sections"]))
    if kind == "ddim":
        stride = draw(st.integers(1, num_timesteps - 1))
        count = len(range(0, num_timesteps, stride))  # >= 2 as stride < T
        return (name, num_timesteps), f"ddim{count}", count
    if kind == "count":
        count = draw(st.integers(2, num_timesteps))
        return (name, num_timesteps), str(count), count
    sections = draw(st.integers(1, min(4, num_timesteps)))
    size = num_timesteps // sections  # every section has at least this many steps
    counts = [draw(st.integers(1, size)) for _ in range(sections)]
    if sum(counts) < 2:  # one section of T >= 2 steps; keep at least two steps
        counts[0] = 2
    return (name, num_timesteps), ",".join(map(str, counts)), sum(counts)


@given(respacings())
def test_respacing_keeps_alphas_cumprod_at_the_kept_steps(case):
    schedule, sections, count = case
    base = GaussianDiffusion.named(*schedule)
    respaced = base.respace(sections)
    kept = respaced.timestep_map
    assert respaced.num_timesteps == len(kept) == count
    assert kept[0] == 0 and bool((kept.diff() > 0).all()) and int(kept[-1]) < schedule[1]
    assert kept.tolist() == space_timesteps(schedule[1], sections)
    # ᾱ is rebuilt as a product of 1 - β', so tiny ᾱ near t = T only match absolutely.
    np.testing.assert_allclose(
        respaced.alphas_cumprod.numpy(), base.alphas_cumprod.numpy()[kept.numpy()],
        rtol=1e-10, atol=1e-14,
    )
    assert GaussianDiffusion.named(*schedule, respacing=sections).timestep_map.tolist() == kept.tolist()


def test_respacing_to_a_single_step_is_possible():
    one = GaussianDiffusion.named("linear", 1000).respace("1")
    assert one.timestep_map.tolist() == [0]


def test_respacing_with_all_steps_is_the_identity():
    base = GaussianDiffusion.named("linear", 1000)
    same = base.respace("1000")
    assert same.timestep_map.tolist() == list(range(1000))
    np.testing.assert_allclose(same.betas.numpy(), base.betas.numpy(), rtol=1e-12)


@pytest.mark.parametrize("sections", [
    "", "abc", "ddim", "ddimx", "ddim0", "ddim2000", "0", "-3", "1001", "1.5", "10,,5",
    "300,300,300,300", "1,2,0",
])
def test_invalid_respacing_strings_raise_value_error(sections):
    with pytest.raises(ValueError):
        GaussianDiffusion.named("linear", 1000).respace(sections)


@pytest.mark.parametrize("betas", [[0.1, 0.0], [0.1, 1.5], [[0.1, 0.2]], [0.1, float("nan")]])
def test_betas_outside_0_1_are_rejected(betas):
    with pytest.raises(ValueError):
        GaussianDiffusion(betas)


# ``extract`` casts the float64 tables to float32 (as ADM does), which bounds how exactly the
# conversions can invert each other where they divide by a small coefficient.
ROUND_TRIP_ATOL = {"linear": 1e-5, "cosine": 3e-5}
DIFFUSIONS = {name: GaussianDiffusion.named(name, 1000) for name in ("linear", "cosine")}


@st.composite
def noised(draw):
    """(diffusion name, diffusion, x0, eps, t) for a small batch."""
    name = draw(st.sampled_from(["linear", "cosine"]))
    diffusion = DIFFUSIONS[name]
    seed = draw(st.integers(0, 2**32 - 1))
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, generator=generator)
    eps = torch.randn(4, 3, 5, generator=generator)
    t = torch.tensor(draw(st.lists(st.integers(0, 999), min_size=4, max_size=4)))
    return name, diffusion, x0, eps, t


@given(noised())
def test_eps_to_x0_to_eps_round_trips(case):
    name, diffusion, x0_true, eps, t = case
    x_t = diffusion.q_sample(x0_true, t, eps)
    x0 = diffusion.predict_xstart_from_eps(x_t, t, eps)
    again = diffusion.predict_eps_from_xstart(x_t, t, x0)
    # the float32 coefficients' rounding scales with |x_t|
    error = (again - eps).abs()
    assert bool((error <= ROUND_TRIP_ATOL[name] * (1 + x_t.abs())).all()), float(error.max())
    # and q_sample puts that x0 back at x_t
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), x_t, rtol=0, atol=1e-5)


@given(noised())
def test_v_to_x0_round_trips(case):
    _, diffusion, x0, eps, t = case
    x_t = diffusion.q_sample(x0, t, eps)
    v = diffusion.v_target(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_xstart_from_v(x_t, t, v), x0, rtol=0, atol=1e-5)


@given(noised(), st.sampled_from(["eps", "x0", "v"]))
def test_every_prediction_target_converts_back_to_x0_and_eps(case, prediction):
    name, diffusion, x0, eps, t = case
    x_t = diffusion.q_sample(x0, t, eps)
    target = diffusion.target(prediction, x0, t, eps)
    x0_hat, eps_hat = diffusion.xstart_and_eps(prediction, x_t, t, target)
    # x0 from eps divides by sqrt(abar_t), which is tiny at large t: compare it where stable.
    stable = diffusion.sqrt_alphas_cumprod[t] > 0.1
    torch.testing.assert_close(x0_hat[stable], x0[stable], rtol=0, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=10 * ROUND_TRIP_ATOL[name])


def test_q_sample_matches_the_closed_form():
    diffusion = DIFFUSIONS["linear"]
    x0, eps, t = torch.ones(3, 2), torch.full((3, 2), 2.0), torch.tensor([0, 499, 999])
    abar = diffusion.alphas_cumprod[t].unsqueeze(1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), expected.float())


def test_posterior_mean_is_the_true_mean_of_x_t_minus_1():
    """q(x_{t-1}|x_t, x0) mean equals the DDPM formula written out from ᾱ."""
    diffusion = DIFFUSIONS["cosine"]
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    x_t = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 10, 999])
    abar, abar_prev = diffusion.alphas_cumprod[t], diffusion.alphas_cumprod_prev[t]
    beta = 1 - abar / abar_prev
    coef_x0 = (abar_prev.sqrt() * beta / (1 - abar)).unsqueeze(1)
    coef_xt = ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)).unsqueeze(1)
    mean, variance, _ = diffusion.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, (coef_x0 * x0 + coef_xt * x_t).float())
    torch.testing.assert_close(
        variance.flatten(), (beta * (1 - abar_prev) / (1 - abar)).float(), rtol=1e-6, atol=0
    )


def test_unknown_names_raise_value_error_listing_the_choices():
    diffusion = DIFFUSIONS["linear"]
    x, t = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="allowed: eps, x0, v"):
        diffusion.target("score", x, t, x)
    with pytest.raises(ValueError, match="allowed: fixed-large, fixed-small"):
        diffusion.p_mean_variance(x, x, t, variance="learned")
