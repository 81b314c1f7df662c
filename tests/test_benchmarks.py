"""Smoke tests of the benchmark scripts: they run at a tiny size and report what they promise."""

from __future__ import annotations

import json
import statistics
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
    # the peak is the best of a timing before the steps and one after
    assert report["peak_tflops_fp32"] == max(report["peak_tflops_fp32_by_layout"].values())
    assert report["mfu"] == pytest.approx(report["tflops"] / report[f"peak_tflops_{report['precision']}"])
    # the cost ratio is the median of the rounds' paired ratios (two timed rounds)
    by_round = [(engine / report["noised_tokens_per_step"])
                / (incontext / report["incontext"]["noised_tokens_per_step"])
                for engine, incontext in zip(report["step_s"], report["incontext"]["step_s"], strict=True)]
    assert report["cost_ratio_by_round"] == pytest.approx(by_round)
    assert report["cost_per_noised_token_ratio"] == pytest.approx(statistics.median(by_round))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_step_reports_dit(dtype):
    report = train_step("--method", "dit", "--dtype", dtype, "--compare-incontext")
    assert report["method"] == "dit" and "baseline" not in report
    assert_measured(report)
    assert report["sequence_length"] == 16  # no condition tokens: t and class go to adaLN
    assert report["cost_per_noised_token_ratio"] > 0


DATA = ROOT / "benchmarks" / "perf" / "data.py"


def test_data_reports_the_loader_against_the_training_step():
    done = subprocess.run(
        [sys.executable, str(DATA), "--batch", "8", "--batches", "3", "--warmup", "1", "--repeats", "2",
         "--train-steps", "2", "--train-warmup", "1", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["config"] == "digits-tiny.toml" and report["target_ratio"] == 5
    train = report["train"]["samples_per_s"]
    assert train > 0 and len(report["train"]["step_s"]) == 2
    for kind in ("pixels", "latents"):
        loader = report[f"loader_{kind}"]
        assert loader["samples_per_s"] > 0 and len(loader["runs_samples_per_s"]) == 2
        assert loader["errors"] == {"shards": 0, "samples": 0}
        assert report[f"ratio_{kind}"] == pytest.approx(loader["samples_per_s"] / train)
    assert report["ratio"] == min(report["ratio_pixels"], report["ratio_latents"])
    assert report["meets_target"] == (report["ratio"] >= 5)


def test_the_matmul_peak_is_the_best_of_the_timings_before_and_after_the_steps(monkeypatch):
    from cfkit.perf import train_step as module

    before = {"fp32": (128, {"A@B": 1.0, "A@B^T": 0.5}), "bf16": (128, {"A@B": 2.0, "A@B^T": 2.0})}
    after = {"fp32": (128, {"A@B": 0.2, "A@B^T": 0.7}), "bf16": (128, {"A@B": 1.0, "A@B^T": 4.0})}
    monkeypatch.setattr(module, "peaks", lambda args, device: after)
    report = {"precision": "fp32", "tflops": 0.5, "tflops_executed": 0.4}
    module.add_peak(None, report, "cpu", before)
    assert report["peak_tflops_fp32_by_layout"] == {"A@B": 1.0, "A@B^T": 0.7}
    assert report["peak_tflops_fp32"] == 1.0 and report["peak_tflops_bf16"] == 4.0
    assert report["mfu"] == 0.5 and report["mfu_executed"] == 0.4
