"""Smoke tests of cfkit.perf.report: the tiny report has every benchmark, and a failed
sub-benchmark becomes a row with its stderr. The scripts in benchmarks/perf run the modules."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfkit import precision
from cfkit.perf import report

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "perf" / "run_all.py"
MODULES = {"run_all": "report", "train_step": "train_step", "sample": "sample", "masks": "masks",
           "data": "data", "mlp": "mlp"}
KINDS = {"mask build", "train step", "K copies", "sampling", "benchmark model", "time split", "loader",
         "matmul peak", "MFU"}
# bf16 steps run where bf16 is native; where it is emulated (~100x slower) the report skips them
DTYPES = ("fp32", "bf16") if precision.native_bf16() else ("fp32",)
TRAINED = {f"{method} {dtype}" for method in ("causalfusion", "incontext-dit", "dit") for dtype in DTYPES}


def settings(rows: list[dict], benchmark: str) -> set[str]:
    """The settings of one benchmark's rows, up to the first comma (``causalfusion fp32``)."""
    return {r["setting"].split(",")[0] for r in rows if r["benchmark"] == benchmark}


def test_tiny_report_has_a_positive_figure_for_every_benchmark_and_writes_both_files(tmp_path):
    done = subprocess.run(
        [sys.executable, str(RUN_ALL), "--size", "tiny", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    perf = json.loads(done.stdout)
    assert json.loads((tmp_path / "perf.json").read_text()) == perf
    rows = perf["rows"]
    assert {r["benchmark"] for r in rows} == KINDS
    for r in rows:
        assert r["error"] is None, r
        value = r["value"]
        assert isinstance(value, int | float) and not isinstance(value, bool), r
        assert math.isfinite(value) and value > 0, r
        assert r["ratio"] is None or (math.isfinite(r["ratio"]) and r["ratio"] > 0), r
    assert settings(rows, "train step") == TRAINED
    assert settings(rows, "MFU") == TRAINED
    # the precision auto takes (the suite sets CFKIT_PRECISION, which the report follows)
    fast = precision.resolve("auto", "cpu", 32).name
    assert perf["auto_precision"]["precision_used"] == fast
    assert settings(rows, "K copies") == {f"causalfusion K=1 {fast}", f"causalfusion K=2 {fast}"}
    assert {r["figure"] for r in rows if r["benchmark"] == "K copies"} == {
        "step time per noised token", "executed matmul FLOPs per noised token"}
    assert settings(rows, "sampling") == {f"S=1 {fast}", f"S=4 {fast}", f"S=16 {fast}", "blocks forward"}
    assert settings(rows, "matmul peak") == {"fp32 256^3", "bf16 256^3"}
    # where the time goes in the steps the speed targets are about, and what is left to gain
    splits = {}
    for r in rows:
        if r["benchmark"] == "time split" and not r["figure"].startswith("speed-up bound"):
            setting = re.sub(r", T=[0-9.]+", "", r["setting"])  # the sequence length drawn
            splits[setting] = splits.get(setting, 0) + r["value"]
    assert set(splits) == {f"causalfusion {fast} train step",
                           "reference eager fp32 train step", f"S=1 {fast} diffusion step",
                           "reference S=1 eager fp32 diffusion step"}
    assert all(math.isclose(total, 100) for total in splits.values()), splits
    bounds = [r for r in rows if r["figure"].startswith("speed-up bound")]
    assert len(bounds) == 3 and all(r["target"] and r["met"] is not None for r in bounds)
    # the benchmark model: fp32 on one thread against the reference, its time split and bound
    bench = [r for r in rows if r["benchmark"] == "benchmark model"]
    assert {r["setting"].split(",")[0] for r in bench} == {"causalfusion fp32"}
    assert all(", batch 32, 1 thread" in r["setting"] for r in bench)
    [speed] = [r for r in bench if r["figure"] == "images/s, train step median"]
    assert speed["target"] == "ratio >= 2" and speed["ratio"] > 0
    assert sum(r["value"] for r in bench if r["unit"] == "% of operator time") == pytest.approx(100)
    [bench_job] = [job for job in perf["jobs"] if job["benchmark"] == "benchmark model"]
    assert bench_job["command"].startswith("OMP_NUM_THREADS=1 python benchmarks/perf/train_step.py")
    assert bench_job["report"]["threads"] == 1
    # the ratios the sub-benchmarks report against their baselines reach the table
    ratios = {(r["benchmark"], r["setting"].split(",")[0], r["figure"]): r["ratio"] for r in rows}
    for dtype in DTYPES:
        assert ratios["train step", f"causalfusion {dtype}", "step (fwd+bwd+AdamW+EMA), median"] > 0
    for steps in (1, 4, 16):
        assert ratios["sampling", f"S={steps} {fast}", "diffusion step, KV-cached, median"] > 0
    # issue 17's targets are stated beside the figures they apply to
    targeted = {(r["benchmark"], r["setting"].split(",")[0]) for r in rows if r["target"]}
    assert ("train step", f"causalfusion {fast}") in targeted
    assert ("sampling", "S=16 " + fast) in targeted and ("sampling", "S=1 " + fast) in targeted
    assert all(r["met"] is not None for r in rows if r["benchmark"] in {"mask build", "loader"})
    assert all("--device" in job["argv"] for job in perf["jobs"]
               if job["command"].split()[1].endswith(("train_step.py", "sample.py")))
    assert perf["size"] == "tiny" and perf["machine"]["cpu_count"] >= 1
    assert len(perf["load_average_start"]) == 3 and "torch" in perf["machine"]
    table = (tmp_path / "perf.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # the header and one line per row
    assert "bf16/fp32 matmul throughput ratio" in table
    assert ("the bf16 training steps are not run" in table) == (not precision.native_bf16())
    assert f'`precision = "auto"` takes {fast} here' in table
    assert all(job["command"] in table for job in perf["jobs"])


def test_a_failed_sub_benchmark_becomes_a_row_with_its_stderr():
    job = report.Job("mask build", "dense mask", "masks", ("--tokens", "many"), (report.mask_rows,))
    assert job.argv()[1:3] == ["-m", "cfkit.perf.masks"]
    assert job.command().startswith("python benchmarks/perf/masks.py --tokens many")
    outcome = report.run_job(job, dict(os.environ), timeout_s=60)
    [failed] = report.job_rows(job, outcome, {})
    assert failed["benchmark"] == "mask build" and failed["value"] is None
    assert "exit status 2" in failed["error"] and "invalid int value" in failed["error"]


def cpu_run(dtype: str, auto: str, **fields) -> dict:
    """A sub-benchmark's JSON as far as the targets read it: a CPU run in ``dtype`` where
    ``auto`` takes ``auto``, on a CPU whose flags show native bf16."""
    return {"device": "cpu", "cpu_native_bf16": ["avx512_bf16"], "dtype": dtype,
            "auto_precision": auto, **fields}


@pytest.mark.parametrize("dtype, auto, target", [
    ("bf16", "bf16", 4.0),  # bf16 native and faster: the bf16 target
    ("fp32", "fp32", 1.5),  # bf16 emulated, or native but slower than fp32 (the probe)
    ("bf16", "fp32", None),  # a precision auto does not take here gets no target
    ("fp32", "bf16", None),
])
def test_speed_targets_follow_the_precision_auto_takes_not_the_cpu_flags(dtype, auto, target):
    assert report.speed_target(cpu_run(dtype, auto)) == target
    assert report.speed_target({**cpu_run(dtype, auto), "device": "NVIDIA H200"}) is None
    mfu = report.mfu_rows(cpu_run(dtype, auto, method="causalfusion", sequence_length=260,
                                  tflops=0.1), {dtype: 0.2})
    assert [r["target"] for r in mfu] == ([">= 55%"] if dtype == auto == "bf16" else [None])
    assert mfu[0]["value"] == pytest.approx(50) and mfu[0]["met"] is (False if mfu[0]["target"] else None)


def test_where_auto_takes_fp32_despite_native_bf16_flags_copies_and_sampling_run_in_fp32(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: ["avx512_bf16"])
    jobs = report.plan(report.SIZES["tiny"], "cpu", "fp32")
    dtype = {job.setting: job.args[job.args.index("--dtype") + 1] for job in jobs if "--dtype" in job.args}
    assert {s for s in dtype if s.startswith(("causalfusion K", "S="))} == {
        "causalfusion K=2 fp32", "S=1 fp32", "S=4 fp32", "S=16 fp32"}
    assert {d for s, d in dtype.items() if s.startswith(("causalfusion K", "S="))} == {"fp32"}
    # bf16 is native, not emulated: its training steps still run, for the bf16/fp32 comparison
    assert {"causalfusion bf16", "dit bf16", "causalfusion fp32", "dit fp32"} <= set(dtype)
    monkeypatch.setattr(precision, "native_bf16", lambda: [])
    emulated = report.plan(report.SIZES["tiny"], "cpu", "fp32")
    assert not [job for job in emulated if job.setting.endswith("bf16")]


@pytest.mark.parametrize("mfu, warned", [(111.8, True), (64.5, False)])
def test_an_mfu_over_100_percent_is_called_untrustworthy(mfu, warned):
    perf = {"machine": {"cpu": "Xeon", "cpu_count": 2, "cpu_capability": "AVX512", "torch": "2.13.0",
                        "gpu": None},
            "network": [], "omp_num_threads": None, "wall_s": 1.0, "jobs": [], "native_bf16": True,
            "auto_precision": {"precision_used": "fp32", "precision_reason": "auto: probed"},
            "load_average_start": [0.1] * 3, "load_average_end": [0.1] * 3,
            "rows": [report.row("MFU", "causalfusion fp32, T=502", "dense FLOPs / matmul peak", mfu, "%")]}
    text = "\n".join(report.notes(perf))
    assert ("MFU over 100% (causalfusion fp32, T=502)" in text) == warned


@pytest.mark.parametrize("script", sorted(MODULES))
def test_each_script_in_benchmarks_perf_runs_its_cfkit_perf_module(script):
    names = runpy.run_path(str(ROOT / "benchmarks" / "perf" / f"{script}.py"))  # not as __main__
    assert names["main"] is importlib.import_module(f"cfkit.perf.{MODULES[script]}").main


def test_the_mlp_benchmark_times_the_fused_kernel_on_every_cpu_and_says_if_the_engine_runs_it():
    from cfkit.perf import mlp

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    args = mlp.parser().parse_args(["--hidden", "32", "--depth", "2", "--heads", "2", "--batch", "2",
                                    "--latent", "4", "--patch", "1", "--rounds", "3"])
    out = mlp.run(args)
    assert out["engine_fuses"] == (precision.cpu_capability() == "AVX512")
    assert out["rows"] == (4, 4 + 16, 32)
    assert len(out["fused_s"]) == len(out["unfused_s"]) == 3
    pairs = zip(out["fused_s"], out["unfused_s"], strict=True)
    assert out["speedup"] == statistics.median(unfused / fused for fused, unfused in pairs)
    [row] = report.mlp_rows(out, {})
    assert row["ratio"] == out["speedup"] and ("run here" in row["figure"]) == out["engine_fuses"]


def test_the_benchmark_model_rows_give_the_compiled_step_against_eager_and_the_compiling_time():
    split = {"shares": {"linear matmuls": 0.4, "attention": 0.2, "everything else": 0.4},
             "others": [("aten::gelu", 0.01)], "total_s": 0.1, "wall_s": 0.2, "kernels_s": 0.12}
    out = {"method": "causalfusion", "dtype": "fp32", "sequence_length": 130, "threads": 1,
           "settings": {"hidden": 64, "depth": 4, "batch": 32, "latent": 8, "patch": 1},
           "images_per_s": 150.0, "warmup_s": [0.3, 0.2], "speedup_vs_reference": 1.3,
           "speedup_by_round": [1.2, 1.3, 1.4], "compile_speedup_by_round": [1.0, 1.05, 1.1],
           "speedup_bound_vs_reference": 2.17, "profile": split,
           "baseline": {"images_per_s": 115.0},
           "compiled": {"images_per_s": 160.0, "warmup_s": [60.3, 30.2]}, "compile_speedup": 1.05}
    rows = report.bench_rows(out, {})
    speed, compiled = rows[0], rows[1]
    assert speed["setting"] == "causalfusion fp32, D=64 depth 4, 64 tokens (T=130), batch 32, 1 thread"
    assert (speed["ratio"], speed["target"], speed["met"]) == (1.3, "ratio >= 2", False)
    assert compiled["figure"] == "images/s with train.compile = true" and compiled["ratio"] == 1.05
    assert "compiling about 90 s in the 2 warm-up steps" in compiled["baseline"]
    assert (speed["ratio_ci"], compiled["ratio_ci"]) == ([1.2, 1.4], [1.0, 1.1])
    bound = rows[-1]
    assert bound["benchmark"] == "benchmark model" and bound["value"] == 2.17 and bound["met"] is True
    assert len(report.bench_rows({k: v for k, v in out.items() if k != "compiled"}, {})) == len(rows) - 1


def test_sampling_pairs_its_variants_by_round_and_alternates_their_order(capsys):
    from cfkit.perf import sample

    args = sample.parser().parse_args(["--hidden", "32", "--depth", "2", "--heads", "2", "--batch", "2",
                                       "--latent", "8", "--patch", "2", "--dtype", "fp32", "--device", "cpu",
                                       "--ar-steps", "4", "--steps", "5", "--measure", "2", "--rounds", "3"])
    out = sample.run(args)
    log = capsys.readouterr().err
    assert "round 1/3: cached, reference, uncached" in log and "round 2/3: uncached, reference, cached" in log
    assert len(out["step_s"]) == len(out["reference"]["step_s"]) == len(out["uncached"]["step_s"]) == 6
    assert len(out["speedup_by_round"]) == len(out["cached_speedup_by_round"]) == 3
    assert out["speedup_vs_reference"] == statistics.median(out["speedup_by_round"])
    assert out["cached_speedup"] == statistics.median(out["cached_speedup_by_round"])
    by_round = zip(out["median_step_s_by_round"], out["uncached"]["median_step_s_by_round"], strict=True)
    assert out["cached_speedup_by_round"] == [uncached / cached for cached, uncached in by_round]
    # images/s of the pooled steps: batch / (median step * T per AR step * S)
    assert out["images_per_s"] == pytest.approx(2 / (statistics.median(out["step_s"]) * 5 * 4))
    assert out["reference"]["images_per_s"] == pytest.approx(2 / (out["reference"]["median_step_s"] * 5))


def test_a_ratio_of_paired_rounds_gets_its_interval_and_a_target_inside_it_is_not_resolvable():
    def k8(rounds):
        return report.row("K copies", "causalfusion K=8 fp32", "step time per noised token", 1776.0, "us",
                          ratio=statistics.median(rounds), ratio_of="value/baseline", rounds=rounds,
                          **report.target_fields(statistics.median(rounds), most=1.15))

    spanning, clear = k8([1.30, 1.09, 1.38, 1.21, 1.27]), k8([1.30, 1.19, 1.38, 1.21, 1.27])
    single = k8([1.27])
    assert spanning["ratio_ci"] == [1.09, 1.38] and spanning["ratio_ci_level"] == 0.9375
    assert (spanning["met"], spanning["resolved"]) == (False, False)
    assert (clear["met"], clear["resolved"]) == (False, True)
    assert single["ratio_ci"] is None and single["resolved"] is None and single["met"] is False
    perf = {"size": "tiny", "device": "cpu", "notes": [], "omp_num_threads": None, "jobs": [],
            "rows": [spanning, clear, single]}
    lines = report.markdown(perf).splitlines()
    [spanning_line] = [line for line in lines if "1.09-1.38" in line]
    assert "1.27 (value/baseline); 94% CI 1.09-1.38 over 5 rounds" in spanning_line
    assert spanning_line.endswith("| NO (the CI spans the target: not resolvable) |")
    assert sum(line.endswith("| ratio <= 1.15 | NO |") for line in lines) == 2  # clear and single
