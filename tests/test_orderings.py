"""Token orderings: every built-in gives permutations of the raster indices."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cfkit
from cfkit.orderings import inverse


@st.composite
def ordering_cases(draw):
    """(ordering name, options, batch size, grid) with the grid valid for the ordering."""
    name = draw(st.sampled_from(["raster", "random", "block-raster", "dilated"]))
    options = {}
    if name == "block-raster":
        block = draw(st.integers(1, 4))
        options = {"block": block}
    if name == "dilated":
        options = {"dilation": draw(st.integers(1, 4))}
    grid = (draw(st.integers(1, 10)), draw(st.integers(1, 10)))  # blocks may be partial
    return name, options, draw(st.integers(1, 4)), grid


@given(ordering_cases(), st.integers(0, 2**32 - 1))
def test_orderings_are_permutations(case, seed):
    name, options, batch, (h, w) = case
    ordering = cfkit.build("orderings", name, **options)
    order = ordering(batch, (h, w), torch.Generator().manual_seed(seed))
    assert order.dtype == torch.long
    assert order.shape == (batch, h * w)
    for row in order.tolist():
        assert sorted(row) == list(range(h * w))


@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_random_ordering_depends_only_on_the_generator_seed(h, w, batch, seed):
    ordering = cfkit.build("orderings", "random")
    torch.manual_seed(seed + 1)  # the global RNG must not matter
    first = ordering(batch, (h, w), torch.Generator().manual_seed(seed))
    torch.manual_seed(seed + 2)
    torch.rand(17)
    second = ordering(batch, (h, w), torch.Generator().manual_seed(seed))
    assert torch.equal(first, second)


def test_random_ordering_differs_between_samples_and_seeds():
    ordering = cfkit.build("orderings", "random")
    a = ordering(2, (8, 8), torch.Generator().manual_seed(0))
    b = ordering(2, (8, 8), torch.Generator().manual_seed(1))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, b)


@given(ordering_cases())
def test_inverse_undoes_an_ordering(case):
    name, options, batch, grid = case
    order = cfkit.build("orderings", name, **options)(batch, grid, torch.Generator())
    positions = inverse(order)
    expected = torch.arange(order.shape[1]).expand_as(order)
    assert torch.equal(torch.gather(order, 1, positions), expected)


def test_raster_is_row_major():
    assert cfkit.build("orderings", "raster")(2, (2, 3)).tolist() == [[0, 1, 2, 3, 4, 5]] * 2


def test_block_raster_visits_blocks_in_raster_order():
    order = cfkit.build("orderings", "block-raster", block=2)(1, (4, 4))
    assert order.tolist() == [[0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]]


def test_block_raster_makes_the_last_block_row_and_column_partial_where_k_does_not_divide():
    order = cfkit.build("orderings", "block-raster", block=2)(1, (3, 3))
    assert order.tolist() == [[0, 1, 3, 4, 2, 5, 6, 7, 8]]


def test_dilated_visits_strided_phases_in_raster_order():
    order = cfkit.build("orderings", "dilated", dilation=2)(1, (4, 4))
    assert order.tolist() == [[0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]]


@pytest.mark.parametrize(
    "name, options, grid",
    [("block-raster", {"block": 0}, (4, 4)),
     ("dilated", {"dilation": 0}, (4, 4)), ("raster", {}, (0, 4)), ("random", {}, (4, -1))],
)
def test_invalid_ordering_options_or_grids_raise_value_error(name, options, grid):
    with pytest.raises(ValueError):
        cfkit.build("orderings", name, **options)(1, grid)
