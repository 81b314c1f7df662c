"""Training timestep samplers: t per (sample, copy, AR step), gathered per token."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import cfkit
from cfkit.timesteps import per_token

shapes = st.tuples(st.integers(1, 5), st.integers(1, 12), st.integers(1, 4), st.integers(1, 1000))
seeds = st.integers(0, 2**32 - 1)


@given(st.sampled_from(["shared", "per-step"]), shapes, seeds)
def test_timestep_samplers_return_B_K_S_in_range(name, shape, seed):
    batch, steps, copies, num_timesteps = shape
    sampler = cfkit.build("timestep_samplers", name)
    t = sampler(batch, steps, copies, num_timesteps, torch.Generator().manual_seed(seed))
    assert t.dtype == torch.long and t.shape == (batch, copies, steps)
    assert bool((t >= 0).all()) and bool((t < num_timesteps).all())
    again = sampler(batch, steps, copies, num_timesteps, torch.Generator().manual_seed(seed))
    assert torch.equal(t, again)


@given(shapes, seeds)
def test_shared_timesteps_are_constant_along_steps(shape, seed):
    t = cfkit.build("timestep_samplers", "shared")(*shape, torch.Generator().manual_seed(seed))
    assert bool((t == t[:, :, :1]).all())


def test_per_step_timesteps_vary_along_steps_and_copies():
    t = cfkit.build("timestep_samplers", "per-step")(2, 16, 3, 1000, torch.Generator().manual_seed(0))
    assert not bool((t == t[:, :, :1]).all())
    assert not bool((t == t[:, :1, :]).all())


@st.composite
def plans(draw):
    """(t, step): t ``(B, K, S_max)`` and non-decreasing per-position steps ``(B, L)``."""
    batch, copies, num_tokens = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 16))
    rows = []
    for _ in range(batch):
        jumps = draw(st.lists(st.booleans(), min_size=num_tokens - 1, max_size=num_tokens - 1))
        row = [0]
        for jump in jumps:
            row.append(row[-1] + int(jump))
        rows.append(row)
    max_steps = max(row[-1] for row in rows) + 1
    t = draw(st.lists(st.integers(0, 999), min_size=batch * copies * max_steps,
                      max_size=batch * copies * max_steps))
    return torch.tensor(t).reshape(batch, copies, max_steps), torch.tensor(rows)


@given(plans())
def test_per_token_gathers_the_timestep_of_each_tokens_step(case):
    t, step = case
    got = per_token(t, step)
    batch, copies, _ = t.shape
    assert got.shape == (batch, copies, step.shape[1])
    for b in range(batch):
        for k in range(copies):
            assert got[b, k].tolist() == [int(t[b, k, s]) for s in step[b].tolist()]
