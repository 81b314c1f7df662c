"""The generalised causal mask, checked against a by-hand construction of the rule.

The expected masks here are built token by token from the paper's rules with Python loops,
independently of ``cfkit.masks.may_attend``.
"""

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import splits

from cfkit import masks
from cfkit.masks import Layout, batch_layout, draw, generalized_causal_mask, sequence_layout
from cfkit.plan import Plan
from cfkit.schedules import step_index

step_sizes = st.lists(st.integers(1, 5), min_size=1, max_size=6)
cond_lens = st.integers(0, 5)
copies = st.integers(1, 3)


def official_tokens(cond_len, step, num_copies, clean_len):
    """The sequence ``[cond | clean of the first clean_len positions | noisy x copies]`` as
    (kind, AR step, copy) per token; ``step`` is the AR step of each position."""
    tokens = [("cond", None, None)] * cond_len
    tokens += [("clean", step[p], None) for p in range(clean_len)]
    tokens += [("noisy", step[p], c) for c in range(num_copies) for p in range(len(step))]
    return tokens


def sees(query, key):
    q_kind, q_step, q_copy = query
    k_kind, k_step, k_copy = key
    if k_kind == "cond":
        return True
    if q_kind == "cond":
        return False
    if q_kind == "clean":
        return k_kind == "clean" and k_step <= q_step
    if k_kind == "clean":
        return k_step < q_step
    return k_step == q_step and k_copy == q_copy


def expected_mask(tokens):
    return torch.tensor([[sees(q, k) for k in tokens] for q in tokens], dtype=torch.bool)


def official_case(cond_len, sizes, num_copies):
    """(our dense mask, tokens of the official layout) for one split."""
    step = [s for s, size in enumerate(sizes) for _ in range(size)]
    tokens = official_tokens(cond_len, step, num_copies, len(step) - sizes[-1])
    return generalized_causal_mask(cond_len, sizes, num_copies), tokens


def rows_of(tokens, kind):
    return [i for i, token in enumerate(tokens) if token[0] == kind]


@given(cond_lens, step_sizes, copies)
def test_noisy_token_of_step_s_sees_cond_earlier_clean_and_its_own_steps_noisy_copy(c, sizes, k):
    mask, tokens = official_case(c, sizes, k)
    rows = rows_of(tokens, "noisy")
    assert len(rows) == k * sum(sizes)
    assert torch.equal(mask[rows], expected_mask(tokens)[rows])


@given(cond_lens, step_sizes, copies)
def test_clean_token_of_step_s_sees_cond_and_clean_tokens_of_steps_up_to_s(c, sizes, k):
    mask, tokens = official_case(c, sizes, k)
    rows = rows_of(tokens, "clean")
    assert len(rows) == sum(sizes) - sizes[-1]
    assert torch.equal(mask[rows], expected_mask(tokens)[rows])


@given(cond_lens, step_sizes, copies)
def test_condition_tokens_see_only_condition_tokens(c, sizes, k):
    mask, _ = official_case(c, sizes, k)
    assert bool(mask[:c, :c].all())
    assert not bool(mask[:c, c:].any())


@given(cond_lens, step_sizes, copies)
def test_every_token_sees_the_condition_tokens(c, sizes, k):
    mask, _ = official_case(c, sizes, k)
    assert bool(mask[:, :c].all())


@given(cond_lens, step_sizes, copies)
def test_no_mask_row_is_empty(c, sizes, k):
    mask, _ = official_case(c, sizes, k)
    assert bool(mask.any(dim=1).all())


@given(cond_lens, step_sizes, copies)
def test_sequence_length_is_C_plus_L_minus_last_step_plus_K_times_L(c, sizes, k):
    mask, _ = official_case(c, sizes, k)
    length = c + (sum(sizes) - sizes[-1]) + k * sum(sizes)
    assert mask.dtype == torch.bool and mask.shape == (length, length)
    assert sequence_layout(c, sizes, k).length == length


@given(cond_lens, st.integers(1, 30))
def test_one_step_gives_the_in_context_dit_mask(c, num_tokens):
    mask = generalized_causal_mask(c, [num_tokens])
    assert mask.shape == (c + num_tokens, c + num_tokens)  # no clean tokens
    assert bool(mask[c:].all())  # noisy block: bidirectional, and sees the condition
    assert bool(mask[:c, :c].all()) and not bool(mask[:c, c:].any())


@given(cond_lens, step_sizes, copies)
def test_sequence_layout_lists_cond_then_clean_then_noisy_copies(c, sizes, k):
    layout = sequence_layout(c, sizes, k)
    num_tokens, clean = sum(sizes), sum(sizes) - sizes[-1]
    step = step_index(torch.tensor(sizes)).tolist()
    assert layout.kind.tolist() == [0] * c + [1] * clean + [2] * (k * num_tokens)
    assert layout.step[c:].tolist() == step[:clean] + step * k
    assert layout.copy[c + clean:].tolist() == [i for i in range(k) for _ in range(num_tokens)]


@given(cond_lens, step_sizes, copies, st.data())
def test_a_key_slice_of_the_layout_gives_that_slice_of_the_mask(c, sizes, k, data):
    layout = sequence_layout(c, sizes, k)
    start = data.draw(st.integers(0, layout.length - 1))
    stop = data.draw(st.integers(start + 1, layout.length))
    full = layout.dense()
    assert torch.equal(layout.dense(layout[start:stop]), full[:, start:stop])
    assert torch.equal(layout[start:stop].dense(), full[start:stop, start:stop])


@st.composite
def per_sample_plans(draw):
    """A Plan whose samples have their own splits of one L, and (cond_len, the splits)."""
    num_tokens = draw(st.integers(1, 20))
    batch = draw(st.integers(1, 3))
    rows = []
    for _ in range(batch):
        rows.append(draw(splits(num_tokens)))
    k = draw(copies)
    step = torch.stack([step_index(torch.tensor(sizes)) for sizes in rows])
    max_steps = max(len(sizes) for sizes in rows)
    plan = Plan(torch.arange(num_tokens).expand(batch, -1), step,
                torch.zeros(batch, k, max_steps, dtype=torch.long))
    return draw(cond_lens), plan, rows


@given(per_sample_plans())
def test_per_sample_plan_layout_follows_the_rule_in_every_row(case):
    c, plan, rows = case
    mask = plan.layout(c).dense()
    num_tokens, k = plan.num_tokens, plan.copies
    # per-sample splits keep all L clean tokens so that every row has the same length
    clean = num_tokens if len({tuple(r) for r in rows}) > 1 else num_tokens - rows[0][-1]
    assert mask.shape == (len(rows), c + clean + k * num_tokens, c + clean + k * num_tokens)
    for b, sizes in enumerate(rows):
        step = [s for s, size in enumerate(sizes) for _ in range(size)]
        tokens = official_tokens(c, step, k, clean)
        assert torch.equal(mask[b], expected_mask(tokens)), f"sample {b}, sizes {sizes}"


@given(cond_lens, step_sizes, copies, st.integers(1, 3))
def test_shared_split_plan_layout_is_the_generalized_causal_mask_per_row(c, sizes, k, batch):
    step = step_index(torch.tensor(sizes)).expand(batch, -1)
    plan = Plan(torch.arange(sum(sizes)).expand(batch, -1), step,
                torch.zeros(batch, k, len(sizes), dtype=torch.long))
    mask = plan.layout(c).dense()
    assert plan.shared_split
    assert torch.equal(mask, generalized_causal_mask(c, sizes, k).expand(batch, -1, -1))


def test_batch_layout_refuses_per_sample_splits_without_clean_len():
    step = torch.tensor([[0, 0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="clean_len"):
        batch_layout(2, step)


def evaluate_mask_mod(layout: Layout) -> torch.Tensor:
    """``mask_mod`` on every (b, q, kv) of a batched layout, by vmap as FlexAttention does."""
    mod = layout.mask_mod()
    batch, length = layout.kind.shape
    index = torch.arange(length)
    over_kv = torch.vmap(mod, in_dims=(None, None, None, 0))
    over_q = torch.vmap(over_kv, in_dims=(None, None, 0, None))
    head = torch.tensor(0)
    return torch.stack([over_q(torch.tensor(b), head, index, index) for b in range(batch)])


@settings(max_examples=15)
@given(per_sample_plans())
def test_flex_attention_mask_mod_equals_the_dense_mask(case):
    c, plan, _ = case
    layout = plan.layout(c)
    assert torch.equal(evaluate_mask_mod(layout), layout.dense())


def test_block_mask_keeps_exactly_the_blocks_with_an_attended_pair():
    pytest.importorskip(
        "torch.nn.attention.flex_attention", reason="this torch has no FlexAttention"
    )
    step = torch.stack([step_index(torch.tensor(s)) for s in ([2, 3, 1], [1, 1, 4])])
    layout = batch_layout(3, step, copies=2, clean_len=6)  # T = 3 + 6 + 12 = 21
    block = 8
    block_mask = layout.block_mask(block_size=block)
    dense = layout.dense()
    blocks = -(-layout.length // block)
    padded = torch.zeros(2, blocks * block, blocks * block, dtype=torch.bool)
    padded[:, : layout.length, : layout.length] = dense
    expected = padded.reshape(2, blocks, block, blocks, block).any(dim=4).any(dim=2)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), expected)
    assert not bool(expected.all())  # some blocks really are skipped


def test_block_masks_are_built_once_per_layout_and_kept_for_the_last_few(monkeypatch):
    pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")
    monkeypatch.setattr(masks, "_BLOCK_MASKS", OrderedDict())
    monkeypatch.setattr(masks, "BLOCK_MASK_CACHE", 2)

    def layout(sizes):
        return batch_layout(3, step_index(torch.tensor(sizes)).expand(2, -1), copies=2)

    first = layout([2, 3, 1]).block_mask(block_size=8)
    assert layout([2, 3, 1]).block_mask(block_size=8) is first  # equal values: the same mask
    other = layout([1, 5]).block_mask(block_size=8)
    assert other is not first and layout([2, 3, 1]).block_mask(block_size=16) is not first
    assert len(masks._BLOCK_MASKS) == 2  # the oldest was dropped
    assert layout([2, 3, 1]).block_mask(block_size=8) is not first


def test_a_drawn_mask_marks_where_condition_clean_and_noisy_tokens_begin():
    lines = draw(sequence_layout(1, [1, 2]))  # T = 1 condition + 1 clean + 3 noisy tokens
    assert lines[0].startswith("row: query, column: key, # = may attend; C condition")
    assert lines[1:] == [
        "  C|c|nnn",
        "C #|.|...",
        "  -+-+---",
        "c #|#|...",
        "  -+-+---",
        "n #|.|#..",
        "n #|#|.##",
        "n #|#|.##",
    ]
