"""Shared test settings: hypothesis profiles, paths and a runner for the ``cfkit`` CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "benchmarks" / "configs" / "factorisation-demo.toml"

# Property tests run many small examples; wall-clock deadlines only make them flaky on a
# loaded 2-core CI machine. `HYPOTHESIS_PROFILE=thorough pytest` digs deeper.
settings.register_profile(
    "cfkit", max_examples=40, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("cfkit"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cfkit"))

# precision "auto" means fp32 in every test and in the cfkit processes they start, whatever this
# machine's bf16 probe says: exact comparisons hold on every CPU (tests/test_precision.py unsets it)
os.environ["CFKIT_PRECISION"] = "fp32"


@pytest.fixture(scope="session")
def demo_config() -> Path:
    return DEMO_CONFIG


def perturbed_checkpoint(experiment, folder: Path) -> Path:
    """A checkpoint of ``experiment``'s untrained model with every parameter moved by
    N(0, 0.05) noise (seed 0), so zero-initialised layers no longer hide the computation."""
    from cfkit import checkpoint

    method = experiment.build_method()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return checkpoint.save(folder, experiment, method.model)


def free_port() -> int:
    """A TCP port free now on this machine (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cfkit(*args: str, pythonpath: str | None = None, check_rc: int | None = None,
              python: tuple[str, ...] = ("-m", "cfkit")) -> subprocess.CompletedProcess:
    """Run ``python -m cfkit ARGS`` (or ``python PYTHON ARGS``) in a fresh interpreter.

    ``pythonpath`` replaces PYTHONPATH (None removes it), so a test controls exactly which
    extra plugins the child process can see.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run(
        [sys.executable, *python, *args], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=120,
    )
    if check_rc is not None:
        assert_rc(result, check_rc)
    return result


def torchrun_cfkit(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``cfkit ARGS`` under torchrun: ``processes`` processes on this machine, in a gloo
    group on the CPU when the caller hides the GPUs (``CUDA_VISIBLE_DEVICES=``)."""
    launcher = ("-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={free_port()}", "-m", "cfkit")
    return run_cfkit(*args, python=launcher)


def assert_rc(result: subprocess.CompletedProcess, rc: int) -> None:
    assert result.returncode == rc, (
        f"rc {result.returncode} != {rc} for {result.args}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}"
    )


def run_cfkit_together(jobs: dict[str, tuple[tuple[str, ...], dict]]
                       ) -> dict[str, subprocess.CompletedProcess]:
    """Several ``run_cfkit(*args, **options)`` at once, jobs given as ``{name: (args,
    options)}``. Each child mostly spends its time importing torch, so running them side by
    side roughly halves the wall time on two cores."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(run_cfkit, *args, **options)
                   for name, (args, options) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="session")
def cli_rc():
    """``cli_rc(completed_process, rc)``: assert the exit status, showing the output if not."""
    return assert_rc


@pytest.fixture(scope="session")
def cfkit_cli():
    """``cfkit_cli(*args, pythonpath=None, check_rc=None, python=("-m", "cfkit"))``."""
    return run_cfkit


@pytest.fixture(scope="session")
def cfkit_cli_together():
    """``cfkit_cli_together({name: (args, options)})``: several CLI runs in parallel."""
    return run_cfkit_together


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one intra-op thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A CFKIT_CACHE shared by the metric and eval tests: the classifiers train once a session."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.getbasetemp() / "metrics-cache"
        patch.setenv("CFKIT_CACHE", str(folder))
        yield folder
