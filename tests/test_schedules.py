"""Factorisation schedules: step sizes are a split of L; per-position steps derive from them."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import splits

import cfkit
from cfkit.schedules import check_step_sizes, draw_steps, sizes_of, step_index, step_start

seeds = st.integers(0, 2**32 - 1)
gammas = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def schedules(draw, num_tokens):
    """A built-in schedule valid for ``num_tokens`` tokens, as (name, options)."""
    name = draw(st.sampled_from(["fixed", "uniform", "exp-decay", "explicit"]))
    if name == "fixed":
        return name, {"steps": draw(st.integers(1, num_tokens))}
    if name == "exp-decay":
        return name, {"gamma": draw(gammas)}
    if name == "explicit":
        return name, {"sizes": draw(splits(num_tokens))}
    return name, {}


@st.composite
def schedule_cases(draw):
    num_tokens = draw(st.integers(1, 300))
    return num_tokens, draw(schedules(num_tokens))


@given(schedule_cases(), seeds)
def test_step_sizes_are_positive_and_sum_to_L(case, seed):
    num_tokens, (name, options) = case
    sizes = cfkit.build("schedules", name, **options)(num_tokens, torch.Generator().manual_seed(seed))
    assert sizes.dtype == torch.long and sizes.dim() == 1
    assert bool((sizes >= 1).all())
    assert int(sizes.sum()) == num_tokens


@given(schedule_cases(), seeds)
def test_number_of_steps_is_between_1_and_L(case, seed):
    num_tokens, (name, options) = case
    sizes = cfkit.build("schedules", name, **options)(num_tokens, torch.Generator().manual_seed(seed))
    assert 1 <= sizes.numel() <= num_tokens
    if name == "explicit":
        assert sizes.tolist() == options["sizes"]


@given(st.integers(1, 300), st.data())
def test_fixed_gives_exactly_S_steps_as_equal_as_possible(num_tokens, data):
    steps = data.draw(st.integers(1, num_tokens))
    sizes = cfkit.build("schedules", "fixed", steps=steps)(num_tokens)
    assert sizes.numel() == steps
    assert int(sizes.max()) - int(sizes.min()) <= 1
    assert sizes.tolist() == sorted(sizes.tolist(), reverse=True)  # larger steps first


@given(st.integers(1, 300), seeds)
def test_exp_decay_gamma_zero_gives_one_step(num_tokens, seed):
    sizes = cfkit.build("schedules", "exp-decay", gamma=0.0)(
        num_tokens, torch.Generator().manual_seed(seed)
    )
    assert sizes.tolist() == [num_tokens]


@given(st.integers(1, 300), seeds)
def test_uniform_is_exp_decay_with_gamma_one(num_tokens, seed):
    uniform = cfkit.build("schedules", "uniform")(num_tokens, torch.Generator().manual_seed(seed))
    exp_decay = cfkit.build("schedules", "exp-decay", gamma=1.0)(
        num_tokens, torch.Generator().manual_seed(seed)
    )
    assert torch.equal(uniform, exp_decay)


@given(schedule_cases(), st.integers(1, 6), seeds)
def test_per_sample_steps_are_non_decreasing_rows_starting_at_zero(case, batch, seed):
    num_tokens, (name, options) = case
    schedule = cfkit.build("schedules", name, **options)
    step = draw_steps(schedule, num_tokens, batch, torch.Generator().manual_seed(seed), True)
    assert step.dtype == torch.long and step.shape == (batch, num_tokens)
    assert bool((step[:, 0] == 0).all())
    jumps = step.diff(dim=1)
    assert bool(((jumps == 0) | (jumps == 1)).all())  # non-decreasing, no step skipped
    for row in step:
        sizes = sizes_of(row)
        assert bool((sizes >= 1).all()) and int(sizes.sum()) == num_tokens


@given(schedule_cases(), st.integers(1, 6), st.booleans(), seeds)
def test_same_generator_seed_gives_the_same_draw(case, batch, per_sample, seed):
    num_tokens, (name, options) = case
    schedule = cfkit.build("schedules", name, **options)
    first = draw_steps(schedule, num_tokens, batch, torch.Generator().manual_seed(seed), per_sample)
    torch.manual_seed(seed ^ 1)  # the global RNG must not matter
    second = draw_steps(schedule, num_tokens, batch, torch.Generator().manual_seed(seed), per_sample)
    assert torch.equal(first, second)
    if not per_sample:
        assert bool((first == first[:1]).all())


def test_per_sample_draws_differ_between_samples():
    schedule = cfkit.build("schedules", "uniform")
    step = draw_steps(schedule, 64, 4, torch.Generator().manual_seed(0), per_sample=True)
    assert len({tuple(row) for row in step.tolist()}) > 1


@given(st.lists(st.integers(1, 6), min_size=1, max_size=12))
def test_step_start_counts_the_tokens_before_each_step(sizes):
    step = step_index(torch.tensor(sizes))
    start = step_start(step)
    assert start.tolist() == [sum(sizes[:s]) for s in step.tolist()]
    assert sizes_of(step).tolist() == sizes


@pytest.mark.parametrize(
    "name, options, num_tokens",
    [("fixed", {"steps": 0}, 4), ("fixed", {"steps": 5}, 4), ("exp-decay", {"gamma": -0.1}, 4),
     ("exp-decay", {"gamma": 1.05}, 4), ("explicit", {"sizes": [2, 3]}, 4),
     ("explicit", {"sizes": [4, 0]}, 4), ("explicit", {"sizes": []}, 4)],
)
def test_invalid_schedules_raise_value_error(name, options, num_tokens):
    with pytest.raises(ValueError):
        cfkit.build("schedules", name, **options)(num_tokens)


@pytest.mark.parametrize("sizes", [[0, 4], [5], [-1, 5], []])
def test_check_step_sizes_rejects_non_splits(sizes):
    with pytest.raises(ValueError, match="summing to L=4"):
        check_step_sizes(sizes, 4)
