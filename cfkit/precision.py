"""The numeric precision of training, sampling and evaluation: ``fp32``, ``bf16`` (autocast:
bf16 matmuls, fp32 weights and reductions) or ``auto``.

``auto`` takes bf16 where its matmuls are native and pay: on CUDA when the device supports
bf16, and on a CPU whose flags show native bf16 (AVX512-BF16 or AMX) when a short probe, a bf16
matmul at the network's width against the same in fp32, runs at least ``PAYS`` times faster.
Elsewhere (an AVX2-only CPU emulates bf16 about 100x slower than fp32; a 64-wide network's
matmuls are too small to gain) it takes fp32. The probe's result is cached per machine, torch
version and width in ``cfkit.data.cache_dir()``; every choice carries its reason, which the
run log and the evaluation report state. ``CFKIT_PRECISION=fp32`` (or ``bf16``) makes ``auto``
mean that everywhere, e.g. for runs that must match across machines (the test suite sets it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PAYS = 1.3  # bf16 / fp32 MLP speed from which auto takes bf16 on a CPU
ENVIRONMENT = "CFKIT_PRECISION"  # fp32 or bf16: what auto means on this machine, whatever it probes


@dataclass(frozen=True)
class Precision:
    """The precision chosen (``fp32`` or ``bf16``) and why."""

    name: str
    reason: str

    def autocast(self, device: torch.device | str):
        """The autocast context of this precision on ``device`` (a no-op for fp32)."""
        device = torch.device(device)
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def record(self) -> dict:
        return {"precision_used": self.name, "precision_reason": self.reason}


def check(requested: str, field: str = "precision") -> str:
    """``requested`` when it is one of ``PRECISIONS``, else a ValueError naming ``field``."""
    if requested not in PRECISIONS:
        raise ValueError(f"{field}: unknown precision {requested!r}; allowed: {', '.join(PRECISIONS)}")
    return requested


def resolve(requested: str, device: torch.device | str, width: int = 1024,
            dtype: torch.dtype = torch.float32) -> Precision:
    """The precision ``requested`` (one of ``PRECISIONS``) means on ``device`` for a network
    ``width`` wide whose weights are ``dtype``."""
    check(requested)
    if requested != "auto":
        return Precision(requested, f"{requested} asked for")
    forced = os.environ.get(ENVIRONMENT)
    if forced:
        check(forced, ENVIRONMENT)
        if forced != "auto":
            return Precision(forced, f"auto: {ENVIRONMENT}={forced}")
    if dtype != torch.float32:
        return Precision("fp32", f"auto: the network's weights are {dtype}, kept as they are")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} has native bf16")
        return Precision("fp32", f"auto: {torch.cuda.get_device_name(device)} has no native bf16")
    if device.type != "cpu":
        return Precision("fp32", f"auto: no bf16 rule for {device.type} devices")
    return _cpu(width)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU flags of ``/proc/cpuinfo`` (empty where there is none), read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(flag for line in text.splitlines() if line.startswith("flags")
                     for flag in line.split(":", 1)[1].split())


@functools.cache
def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels use here: ``AVX512``, ``AVX2``, ``DEFAULT``, ..."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16() -> list[str]:
    """This CPU's flags that show native bf16 (of ``NATIVE_BF16_FLAGS``); empty where bf16 is emulated."""
    return sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())


def _cpu(width: int) -> Precision:
    capability = cpu_capability()
    native = native_bf16()
    if not native:
        return Precision("fp32", f"auto: CPU without native bf16 (torch capability {capability}, "
                                 f"no {' or '.join(NATIVE_BF16_FLAGS)} flag): bf16 would be emulated")
    speedup = probe(width)
    verdict = "bf16" if speedup >= PAYS else "fp32"
    return Precision(verdict, f"auto: CPU with {', '.join(native)} (torch capability {capability}); "
                              f"a {width}-wide MLP ran forward and backward {speedup:.2f}x as fast "
                              f"in bf16 autocast as in fp32 ({'>=' if verdict == 'bf16' else '<'} {PAYS})")


def probe(width: int, repeats: int = 3) -> float:
    """bf16-autocast / fp32 speed of a transformer MLP ``width`` wide (1024 tokens, forward
    and backward, the casts included: small networks lose to them) on this CPU, from the cache
    when this machine, torch version, thread count and width were probed."""
    from cfkit.data import cache_dir, digest

    key = digest([platform.processor(), cpu_model(), torch.__version__, torch.get_num_threads(), width])
    path = cache_dir() / "precision" / f"{key}.json"
    try:
        return float(json.loads(path.read_text())["speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # the caller's random state is untouched
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(approximate="tanh"),
                                  torch.nn.Linear(4 * width, width))
    x = torch.randn(1024, width, generator=generator)
    speedup = _best_time(mlp, x, False, repeats) / _best_time(mlp, x, True, repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"speedup": speedup, "width": width, "cpu": cpu_model(),
                               "torch": torch.__version__}))
    os.replace(tmp, path)
    return speedup


def _best_time(mlp: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    """The fastest of ``repeats`` forward + backward passes after one untimed."""
    best = float("inf")
    with torch.enable_grad():  # resolved inside generation's no_grad too
        for index in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = mlp(x)
            out.float().sum().backward()
            if index:
                best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the machine type."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), platform.machine())
