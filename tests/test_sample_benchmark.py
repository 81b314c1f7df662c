"""Smoke test of benchmarks/perf/sample.py: it runs at a tiny size and reports what it promises."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "sample.py"
TINY = ["--hidden", "32", "--depth", "2", "--heads", "2", "--batch", "2", "--latent", "8",
        "--patch", "2", "--steps", "4", "--measure", "2", "--warmup", "1", "--cfg", "4", "--json"]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("sample_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(benchmark, capsys, *args) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert benchmark.main([*TINY, *args]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out)


def test_sample_benchmark_times_cached_steps_against_both_baselines(benchmark, capsys):
    # one round: its ratios are the rounds' (several rounds: tests/test_perf_report.py)
    result = report(benchmark, capsys, "--dtype", "bf16", "--ar-steps", "4", "--rounds", "1")
    reference, uncached = result["reference"], result["uncached"]
    assert (result["cached"], result["dtype"], result["ar_steps"]) == (True, "bf16", 4)
    assert (reference["attention"], reference["dtype"], reference["ar_steps"]) == ("eager", "fp32", 1)
    assert (uncached["cached"], uncached["ar_steps"]) == (False, 4)
    # AR step S // 2 of 4 equal steps of L = 16 tokens: 8 tokens of context, 4 to denoise
    assert (result["ar_step_measured"], result["context_tokens"], result["step_tokens"]) == (2, 8, 4)
    for entry in (result, reference, uncached):
        assert len(entry["step_s"]) == 2 and entry["median_step_s"] > 0
        assert entry["images_per_s"] == pytest.approx(
            2 / (entry["median_step_s"] * 4 * entry["ar_steps"]))
    assert result["speedup_vs_reference"] == pytest.approx(
        result["images_per_s"] / reference["images_per_s"])
    assert result["cached_speedup"] == pytest.approx(
        uncached["median_step_s"] / result["median_step_s"])


def test_sample_benchmark_refuses_more_timed_steps_than_one_ar_step_has(benchmark):
    with pytest.raises(SystemExit, match="must be <= --steps"):
        benchmark.main([*TINY, "--measure", "4"])
