"""cfkit.perf.breakdown: operators go to the right category, the shares add up, and the bound
is the measured speed-up over the engine's share of time in matmuls and attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cfkit.perf import breakdown

CPU = torch.device("cpu")


@pytest.mark.parametrize(("name", "kind"), [
    ("aten::mm", "linear matmuls"), ("aten::addmm", "linear matmuls"),
    ("mkldnn::_linear_pointwise", "linear matmuls"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_efficient_attention_backward", "attention"), ("aten::bmm", "attention"),
    ("aten::_softmax", "attention"), ("aten::masked_fill_", "attention"),
    ("aten::gelu", "everything else"), ("aten::copy_", "everything else"),
    ("Optimizer.step#AdamW.step", "everything else"),
])
def test_each_operator_goes_to_its_category(name, kind):
    assert breakdown.category(name) == kind


def test_shares_add_up_and_the_largest_others_are_named_largest_first():
    times = {"aten::mm": 3.0, "aten::bmm": 1.0, "aten::gelu": 0.5, "aten::copy_": 0.25,
             **{f"aten::op{i}": 0.01 for i in range(10)}}
    split = breakdown.of_times(times, wall_s=5.0)
    assert split.total_s == pytest.approx(4.85)
    assert split.seconds == pytest.approx({"linear matmuls": 3.0, "attention": 1.0,
                                           "everything else": 0.85})
    assert math.fsum(split.share(kind) for kind in breakdown.CATEGORIES) == pytest.approx(1)
    assert [name for name, _ in split.others[:2]] == ["aten::gelu", "aten::copy_"]
    assert len(split.others) == breakdown.TOP_OTHERS
    record = split.record()
    assert record["kernels_s"] == pytest.approx(4.0) and record["wall_s"] == 5.0


def test_the_bound_is_the_measured_speedup_over_the_engines_share_in_matmuls_and_attention():
    engine = breakdown.of_times({"aten::mm": 1.0, "aten::_softmax": 0.25, "aten::gelu": 2.0}, 5.0)
    assert breakdown.speedup_bound(1.2, engine.record()) == pytest.approx(1.2 * 5.0 / 1.25)
    nothing = breakdown.of_times({"aten::gelu": 2.0}, 2.5)
    assert breakdown.speedup_bound(1.2, nothing.record()) == math.inf


def test_a_profiled_matmul_is_linear_and_a_profiled_softmax_attention():
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    matmul = breakdown.profile_step(lambda: [a @ b for _ in range(4)], CPU)
    assert matmul.share("linear matmuls") > 0.5
    assert matmul.wall_s >= matmul.seconds["linear matmuls"] > 0
    q = torch.randn(2, 2, 64, 16)
    attention = breakdown.profile_step(
        lambda: torch.softmax(q @ q.transpose(-1, -2), -1) @ q, CPU)
    assert attention.seconds["attention"] > 0 and attention.seconds["linear matmuls"] == 0
    gelu = breakdown.profile_step(lambda: F.gelu(a, approximate="tanh"), CPU)
    assert gelu.share("everything else") == 1 and gelu.others[0][0] == "aten::gelu"
