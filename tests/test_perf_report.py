"""Smoke tests of cfkit.perf.report: the tiny report has every benchmark, and a failed
sub-benchmark becomes a row with its stderr. The scripts in benchmarks/perf run the modules."""

from __future__ import annotations

import importlib
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from cfkit import precision
from cfkit.perf import report

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "perf" / "run_all.py"
MODULES = {"run_all": "report", "train_step": "train_step", "sample": "sample", "masks": "masks",
           "data": "data"}
KINDS = {"mask build", "train step", "K copies", "sampling", "loader", "matmul peak", "MFU"}
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
    # the precision training takes on this CPU: bf16 where it is native
    fast = "bf16" if precision.native_bf16() else "fp32"
    assert settings(rows, "K copies") == {f"causalfusion K=1 {fast}", f"causalfusion K=2 {fast}"}
    assert settings(rows, "sampling") == {f"S=1 {fast}", f"S=4 {fast}", f"S=16 {fast}"}
    assert settings(rows, "matmul peak") == {"fp32 256^3", "bf16 256^3"}
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
    assert all(job["command"] in table for job in perf["jobs"])


def test_a_failed_sub_benchmark_becomes_a_row_with_its_stderr():
    job = report.Job("mask build", "dense mask", "masks", ("--tokens", "many"), (report.mask_rows,))
    assert job.argv()[1:3] == ["-m", "cfkit.perf.masks"]
    assert job.command().startswith("python benchmarks/perf/masks.py --tokens many")
    outcome = report.run_job(job, dict(os.environ), timeout_s=60)
    [failed] = report.job_rows(job, outcome, {})
    assert failed["benchmark"] == "mask build" and failed["value"] is None
    assert "exit status 2" in failed["error"] and "invalid int value" in failed["error"]


@pytest.mark.parametrize("script", sorted(MODULES))
def test_each_script_in_benchmarks_perf_runs_its_cfkit_perf_module(script):
    names = runpy.run_path(str(ROOT / "benchmarks" / "perf" / f"{script}.py"))  # not as __main__
    assert names["main"] is importlib.import_module(f"cfkit.perf.{MODULES[script]}").main
