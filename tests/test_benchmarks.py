"""Smoke tests of the benchmark scripts: they run at a tiny size and report what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEP = ROOT / "benchmarks" / "perf" / "train_step.py"
TINY = ["--hidden", "64", "--depth", "2", "--heads", "2", "--batch", "2", "--latent", "8",
        "--patch", "2", "--steps", "2", "--warmup", "1", "--json"]
MEASURED = ["median_step_s", "tflops", "tflops_executed", "images_per_s",
            "noised_tokens_per_s", "sequence_length"]


def train_step(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(TRAIN_STEP), *TINY, *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_measured(entry: dict) -> None:
    for key in MEASURED:
        assert entry[key] > 0, key
    assert len(entry["step_s"]) == 2


def test_train_step_reports_causalfusion_against_its_baselines_and_the_peak():
    report = train_step("--method", "causalfusion", "--copies", "2", "--peak",
                        "--peak-size", "128", "--peak-repeats", "1")
    assert report["method"] == "causalfusion" and report["copies"] == 2
    assert "transformer blocks" in report["flops_counted"]
    for entry in (report, report["baseline"], report["incontext"]):
        assert_measured(entry)
    assert report["baseline"]["attention"] == "eager" and report["baseline"]["dtype"] == "fp32"
    assert report["incontext"]["copies"] == 1
    for key in ["speedup_vs_reference", "cost_per_noised_token_ratio", "peak_tflops_bf16",
                "peak_tflops_fp32", "mfu"]:
        assert report[key] > 0, key
    assert report["noised_tokens_per_step"] == 2 * 2 * 16  # batch * K * L


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_step_reports_dit(dtype):
    report = train_step("--method", "dit", "--dtype", dtype, "--compare-incontext")
    assert report["method"] == "dit" and "baseline" not in report
    assert_measured(report)
    assert report["sequence_length"] == 16  # no condition tokens: t and class go to adaLN
    assert report["cost_per_noised_token_ratio"] > 0
