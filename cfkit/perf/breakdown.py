"""Where a step's time goes: one profiled run of it, its operators' own (self) time summed
into the linear layers' matmuls, attention, and everything else (with the largest of those
named), so that a report can say how much a faster engine could still gain.

The categories go by operator name: ``linear matmuls`` are ``aten::mm`` / ``aten::addmm`` (the
linear layers, forward and backward) and oneDNN's fused linear + GELU of CPU inference;
``attention`` is every operator with "attention" in its name (SDPA's and FlexAttention's
kernels) plus the eager attention's ``bmm``, ``softmax`` and ``masked_fill``. Code that
``torch.compile`` fused counts as everything else. Times are the profiler's self CPU time, or
the self device time on CUDA (where the CPU only launches).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from cfkit.perf.machine import synchronize

# the linear layers' matmuls; oneDNN's linear + pointwise kernel is the MLP's first layer with
# its GELU fused (``transformer.Mlp``), mostly the matmul
LINEAR = frozenset({"aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"})
EAGER_ATTENTION = frozenset({"aten::bmm", "aten::baddbmm", "aten::_softmax",
                             "aten::_softmax_backward_data", "aten::masked_fill_",
                             "aten::masked_fill"})
CATEGORIES = ("linear matmuls", "attention", "everything else")
TOP_OTHERS = 5  # the largest operators of "everything else" a breakdown names


def category(name: str) -> str:
    """The category of the operator ``name`` (one of ``CATEGORIES``)."""
    if name in LINEAR:
        return "linear matmuls"
    if name in EAGER_ATTENTION or "attention" in name:
        return "attention"
    return "everything else"


@dataclass(frozen=True)
class Breakdown:
    """The profiled run in seconds: ``wall_s`` (its time, profiler overhead included),
    ``total_s`` (every operator's self time), ``seconds`` per category, and the ``others``:
    ``[operator, seconds]`` of the largest in everything else, largest first."""

    wall_s: float
    total_s: float
    seconds: dict[str, float]
    others: list[tuple[str, float]]

    def share(self, name: str) -> float:
        """The fraction of the total in category ``name``."""
        return self.seconds[name] / self.total_s if self.total_s else 0.0

    @property
    def kernels_s(self) -> float:
        """Seconds in the linear matmuls and attention: what is left if everything else took
        no time."""
        return self.seconds["linear matmuls"] + self.seconds["attention"]

    def record(self) -> dict:
        """The JSON record: the fields, plus the shares and ``kernels_s``."""
        return {**asdict(self), "others": [list(other) for other in self.others],
                "shares": {name: self.share(name) for name in CATEGORIES},
                "kernels_s": self.kernels_s}


def of_times(times: dict[str, float], wall_s: float) -> Breakdown:
    """The breakdown of ``{operator: self seconds}`` of a run that took ``wall_s``."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    others = Counter()
    for name, spent in times.items():
        kind = category(name)
        seconds[kind] += spent
        if kind == "everything else":
            others[name] += spent
    return Breakdown(wall_s, sum(seconds.values()), seconds,
                     [(name, spent) for name, spent in others.most_common(TOP_OTHERS)])


class Profiler:
    """The profiler around a stretch of work: ``start()``, the work, then ``stop()`` gives its
    breakdown (device time on CUDA, CPU time elsewhere)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiled = profile(activities=activities)
        self.started = 0.0

    def start(self) -> None:
        _warm_up()
        self.profiled.start()
        synchronize(self.device)
        self.started = time.perf_counter()

    def stop(self) -> Breakdown:
        synchronize(self.device)
        wall_s = time.perf_counter() - self.started
        self.profiled.stop()
        times = Counter()
        for event in self.profiled.key_averages():
            spent = event.self_device_time_total if self.cuda else event.self_cpu_time_total
            times[event.key] += spent / 1e6
        return of_times(times, wall_s)


@functools.cache
def _warm_up() -> None:
    """Profile a little work once per process: the first profiled run's first operators
    carry the profiler's start-up (a 64-wide layer norm took 1.4 ms in the first run, 0.04
    ms in the next)."""
    with profile(activities=[ProfilerActivity.CPU]):
        torch.nn.functional.layer_norm(torch.ones(8, 8), (8,)).sum()


def profile_step(run: Callable[[], object], device: torch.device) -> Breakdown:
    """The breakdown of one call of ``run``."""
    profiler = Profiler(device)
    profiler.start()
    run()
    return profiler.stop()


def speedup_bound(speedup: float, engine: dict) -> float:
    """The speed-up over the reference the engine would reach if everything but its linear
    matmuls and attention took no time, at their profiled speed: the ``speedup`` measured
    (paired rounds) over the share of the engine's profiled wall time in those kernels
    (``engine``, a ``Breakdown.record()``). A share is a ratio within one step, so the machine's
    drift from step to step, which the paired speed-up is free of, barely moves it."""
    return speedup * engine["wall_s"] / engine["kernels_s"] if engine["kernels_s"] else float("inf")
