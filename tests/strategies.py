"""Hypothesis strategies shared by the property tests."""

from itertools import pairwise

from hypothesis import strategies as st


@st.composite
def splits(draw, num_tokens: int) -> list[int]:
    """Step sizes of a random split of ``num_tokens`` tokens: distinct cut points in 1..L-1."""
    cuts = sorted(draw(st.sets(st.integers(1, num_tokens - 1)))) if num_tokens > 1 else []
    return [b - a for a, b in pairwise([0, *cuts, num_tokens])]
