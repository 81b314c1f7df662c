"""``--device auto``: every command's ``--device`` defaults to it, it is CUDA when this machine
has CUDA and the CPU otherwise, and on CUDA float32 matmuls and convolutions run on TF32
(a command on the CPU leaves those flags alone). The CUDA cases fake ``torch.cuda``; the last
test checks the trainer's process group on a real GPU, where the machine has one. On Linux, freed
activations stay in the heap (``keep_freed_memory``) rather than coming back as fresh pages."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from cfkit import preflight
from cfkit.cli import parser
from cfkit.distributed import Distributed


@pytest.fixture
def tf32_off():
    """TF32 off, restored after the test (the flags are process-wide; torch computes them, so
    monkeypatch cannot restore them)."""
    before = tf32()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def fake_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def device_defaults() -> dict[str, str]:
    """Each subcommand with a --device option: its default."""
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: action.default for name, sub in commands.items() for action in sub._actions
            if action.dest == "device"}


def test_every_device_option_defaults_to_auto():
    defaults = device_defaults()
    assert set(defaults) >= {"sample", "edit", "caption", "eval", "fid"}
    assert set(defaults.values()) == {"auto"}


def test_auto_is_the_cpu_without_cuda_and_leaves_tf32_alone(monkeypatch, tf32_off):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(command="sample", device="auto", out=None)
    preflight.check(args)
    assert args.device == "cpu"
    assert tf32() == (False, False)


@pytest.mark.parametrize(("asked", "chosen", "tf32_on"), [
    ("auto", "cuda", True),  # auto is CUDA when present and turns TF32 on
    ("cpu", "cpu", False),  # an explicit cpu on a CUDA machine stays the CPU, without TF32
])
def test_on_a_cuda_machine_auto_is_cuda_with_tf32_and_cpu_stays_cpu(asked, chosen, tf32_on, monkeypatch,
                                                                     tf32_off):
    fake_cuda(monkeypatch)
    args = argparse.Namespace(command="sample", device=asked, out=None)
    preflight.check(args)
    assert args.device == chosen
    assert tf32() == (tf32_on, tf32_on)


def test_a_bad_device_names_auto_among_the_allowed():
    with pytest.raises(ValueError, match=r"--device 'gpu' is not a device name; allowed here: cpu.*, auto$"):
        preflight.device("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_turns_tf32_on(tf32_off):
    assert Distributed().device.type == "cuda"
    assert tf32() == (True, True)


STEPS = """
import resource, torch
from cfkit import preflight
preflight.keep_freed_memory()

def step():  # a layer's activations: 6, 12 and 48 MiB, allocated and freed at every step
    x = torch.randn(4096, 384)
    w = torch.randn(384, 3072)
    return float(((x @ w).relu() @ w.t()).sum())

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_freed_activations_are_reused_without_faulting_in_fresh_pages():
    def page_faults(**env) -> int:
        done = subprocess.run([sys.executable, "-c", STEPS], env={**os.environ, **env},
                              capture_output=True, text=True, check=True)
        return int(done.stdout)

    kept, system = page_faults(), page_faults(CFKIT_MALLOC="system")
    if system < 10 * (48 << 20) // 4096:  # glibc's default maps the 48 MiB block afresh each step
        pytest.skip(f"{system} page faults with glibc's defaults: this kernel faults in larger pages")
    assert kept < system / 4
