"""cfkit.bench.runner end to end (tiny models, a few steps): training, evaluation, baselines,
the cache by experiment hash, resuming, --report-only, --shard and torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from cfkit import evaluate
from cfkit.bench import runner
from cfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "configs" / "digits-tiny.toml"


def write_bench(folder: Path, body: str) -> Path:
    path = folder / "bench.toml"
    path.write_text(f'name = "test"\nbase = "{BASE}"\n{body}')
    return path


def test_bench_trains_evaluates_reports_and_resumes(tmp_path, cache, one_thread, capsys, monkeypatch):
    """Two methods, two seeds: DiT cannot sample in 4 AR steps (n/a), every run is evaluated
    with the evaluation's seed, the baselines are scored once, a rerun trains and evaluates
    nothing (nor makes the editing example again), a run cut short resumes from its last
    checkpoint and shards sharing a grid report every run any of them finished."""
    body = """
set = ["train.max_steps=4", "train.ckpt_every=2", "train.batch_size=8", "model.hidden_size=32",
       "model.depth=2"]
seeds = [0, 1]
[evaluation]
metrics = ["fid", "probe", "heldout-loss"]
num = 6
ar_steps = [1, 4]
steps = 2
batch_size = 6
grid_images = 4
baselines = ["independent-pixels", "context-blind-ar"]
baseline_ar_steps = 4
sampler = { name = "ddpm", variance = "fixed-small" }
[[grids]]
table = "6b"
[grids.axes.method]
causalfusion = []
dit = ["method.name=dit", "model.preset=DiT-tiny"]
"""
    path, out = write_bench(tmp_path, body), tmp_path / "out"
    calls, evaluated = [], evaluate.evaluate

    def spy(folder, metrics, **options):
        calls.append((metrics, options))
        return evaluated(folder, metrics, **options)

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "evaluate", spy)
        assert main(["bench", str(path), "--out", str(out), "--no-progress",
                     "--set", "evaluation.seed=3"]) == 0
    assert {options["generation"].seed for _, options in calls} == {3}  # the same for every run
    assert {options["reference_split"] for _, options in calls} == {"val"}
    assert {options["generation"].split_steps for _, options in calls} == {False}
    assert {options["generation"].sampler.variance for metrics, options in calls
            if "fid" in metrics} == {"fixed-small"}
    assert [options["ar_steps"] for metrics, options in calls if "probe" in metrics] == [[1, 4]] * 4
    printed = capsys.readouterr()
    assert "| method | seeds |" in printed.out and "paper (ImageNet 256):" in printed.out
    # a log (no terminal, --no-progress): each run's steps and sampling as lines, no bar's \r
    assert "\r" not in printed.err and printed.err.count("finished: ") == 4
    assert re.search(r"^train \w+: 4/4 steps, loss ", printed.err, re.M)
    assert re.search(r"^sampling S=4: 6/6 images, ", printed.err, re.M)
    results = json.loads((out / "results.json").read_text())
    table, = results["tables"]
    rows = {row["label"]: row for row in table["rows"]}
    headers = [c["header"] for c in table["columns"]]
    fid4 = headers.index("FID-6 (digits-cnn) ↓ S=4 cfg=1")
    assert rows["dit"]["cells"][fid4]["mean"] is None and "1 AR step" in rows["dit"]["cells"][fid4]["skipped"]
    for name in ("causalfusion", "dit"):
        assert rows[name]["seeds"] == [0, 1] and rows[name]["train_flops"] > 0
        fid1 = rows[name]["cells"][headers.index("FID-6 (digits-cnn) ↓ S=1 cfg=1")]
        assert fid1["n"] == 2 and fid1["mean"] > 0 and fid1["ci95"] is not None
    loss4 = rows["causalfusion"]["cells"][headers.index("held-out ε-MSE ↓ S=4")]
    assert loss4["n"] == 2 and loss4["mean"] > 0
    assert [rows[b]["kind"] for b in ("independent-pixels", "context-blind-ar")] == ["baseline"] * 2
    assert rows["context-blind-ar"]["cells"][fid4]["mean"] > 0
    assert [t["column"] for t in table["trends"]] == ["fid ↓ S=1", "probe ↑"]
    cf = next(r for r in results["runs"] if r["label"] == "method=causalfusion")
    sizes = cf["figure4"]["step_size_counts"]
    assert sum(int(k) * c for k, c in sizes.items()) == 2000 * 64  # every draw covers the 64 tokens
    assert next(r for r in results["runs"] if r["label"] == "method=dit")["figure4"] is None
    assert any(r["name"] == "held-out ε-MSE, AR step 4/4" for r in cf["records"])
    assert cf["feature_network"]["name"] == "digits-cnn" and cf["machine"]["threads"] == 1
    report = (out / "report.md").read_text()
    for name in ("loss_curves.png", "figure4.png", "fid_vs_s_eval-0.png", "samples-method_dit-S1-cfg1.png",
                 "samples-method_causalfusion-S4-cfg1.png", "editing-method_causalfusion.png"):
        assert (out / name).stat().st_size > 0 and f"]({name})" in report
    assert "editing-method_dit.png" not in report and "`evaluation.seed=3`" in report

    def again(*args, **kwargs):
        raise AssertionError("a finished run is evaluated (or its editing example made) again")

    (out / "editing-method_causalfusion.png").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(runner, "editing_example", again)
        for name in ("evaluate", "score_samples"):  # runs and baselines
            patch.setattr(evaluate, name, again)
        assert main(["bench", str(path), "--out", str(out), "--no-progress", "--set", "evaluation.seed=3",
                     "--set", "evaluation.grid_images=2"]) == 0  # a report setting: nothing to redo
    assert capsys.readouterr().err.count("trained already") == 4
    assert (out / "editing-method_causalfusion.png").exists()

    run_dir = out / cf["folder"]
    (run_dir / "checkpoints" / "step-0000004").rename(run_dir / "step-4-gone")
    assert main(["bench", str(path), "--out", str(out), "--no-progress", "--set", "evaluation.seed=3"]) == 0
    err = capsys.readouterr().err
    assert err.count("trained already") == 3 and "training 4 steps from step-0000002" in err
    assert (run_dir / "checkpoints" / "step-0000004").exists()

    path.write_text(path.read_text() + 'incontext-dit = ["method.name=incontext-dit"]\n')
    for bad in ("2/2", "1", "a/b"):
        assert main(["bench", str(path), "--out", str(out), "--shard", bad]) == 2
    assert "give I/N" in capsys.readouterr().err
    path.write_text(path.read_text().replace("metrics = [", "seed = 3\nmetrics = ["))  # now in the file
    folders = sorted((out / "runs").iterdir())
    assert main(["bench", str(path), "--out", str(out), "--report-only", "--no-progress"]) == 0
    assert "4 of 6 runs trained and evaluated" in capsys.readouterr().err
    assert sorted((out / "runs").iterdir()) == folders  # nothing trained
    assert "4 runs of 6 (a partial report)" in (out / "report.md").read_text()
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["tables"][0]["rows"]}
    assert rows["incontext-dit"]["seeds"] == [] and rows["causalfusion"]["seeds"] == [0, 1]

    # Shard 1/2 takes runs 2, 4, 6 (1-based): only in-context DiT's seed 1 (run 6) is new. While
    # it trains run 6, shard 0/2 finishes run 5, and the report of the last one has both.
    train_run = runner.train_run

    def other_shard_meanwhile(run, *args, **kwargs):
        if run.seed == 1 and "incontext" in run.label:
            assert main(["bench", str(path), "--out", str(out), "--shard", "0/2", "--no-progress"]) == 0
        return train_run(run, *args, **kwargs)

    monkeypatch.setattr(runner, "train_run", other_shard_meanwhile)
    assert main(["bench", str(path), "--out", str(out), "--shard", "1/2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("[6/6] method=incontext-dit, seed 1") == 1 and err.count("[5/6]") == 1
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["tables"][0]["rows"]}
    assert rows["incontext-dit"]["seeds"] == [0, 1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no report folder left


def test_jobs_train_and_evaluate_runs_in_parallel_processes_with_the_records_of_one(tmp_path, cache, capfd):
    body = """
set = ["train.max_steps=4", "train.ckpt_every=2", "train.batch_size=8", "model.hidden_size=32",
       "model.depth=2"]
[evaluation]
metrics = ["fid", "heldout-loss"]
num = 6
steps = 2
model_ar_steps = [1, 2]
[[grids]]
[grids.axes.method]
causalfusion = []
incontext-dit = ["method.name=incontext-dit"]
"""
    path = write_bench(tmp_path, body)
    assert main(["bench", str(path), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert main(["bench", str(path), "--out", str(tmp_path / "two"), "--no-progress", "--jobs", "2"]) == 0
    err = capfd.readouterr().err
    assert "2 runs, 2 tasks at a time" in err and err.count("] evaluate method=") == 2
    one, two = (json.loads((tmp_path / o / "results.json").read_text()) for o in ("one", "two"))
    # the same records; values to float tolerance (one thread in a worker, two here: sums differ)
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert [(r["metric"], r["name"], r["ar_steps"]) for r in a["records"]] == \
            [(r["metric"], r["name"], r["ar_steps"]) for r in b["records"]]
        values = [r["value"] for r in b["records"]]
        assert [r["value"] for r in a["records"]] == pytest.approx(values, rel=1e-3)
    assert {r["ar_steps"] for r in two["runs"][0]["records"] if r["metric"] == "heldout-loss"} == {1, 2}
    assert main(["bench", str(path), "--out", str(tmp_path / "two"), "--jobs", "0"]) == 2
    assert "jobs: give a number of processes >= 1, got 0" in capfd.readouterr().err


def test_under_torchrun_every_process_trains_and_rank_0_alone_reports(tmp_path):
    body = """
set = ["train.max_steps=4", "train.ckpt_every=2", "train.batch_size=8", "model.hidden_size=32",
       "model.depth=2"]
[evaluation]
metrics = ["probe"]
[[grids]]
[grids.axes.method]
causalfusion = []
"""
    path, out = write_bench(tmp_path, body), tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CFKIT_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "cfkit", "bench", str(path), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("[1/1] method=causalfusion") == 1 and done.stdout.count("| method |") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2
    folder = out / results["runs"][0]["folder"]
    state = json.loads((folder / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["world_size"] == 2
    assert results["tables"][0]["rows"][0]["cells"][0]["mean"] > 0.1  # the probe's top-1


def test_cfkit_bench_needs_a_config_and_out_or_perf(capsys):
    assert main(["bench", str(ROOT / "benchmarks" / "digits-mini.toml")]) == 2
    assert "needs CONFIG and --out DIR (or --perf)" in capsys.readouterr().err


def test_cfkit_bench_perf_runs_the_perf_report_of_the_package_with_its_size_and_folder(
        monkeypatch, tmp_path):
    from cfkit.perf import report

    called = []
    monkeypatch.setattr(report, "main", lambda argv: called.append(argv) or 0)
    assert main(["bench", "--perf", "--size", "tiny", "--out", str(tmp_path)]) == 0
    assert called == [["--size", "tiny", "--out", str(tmp_path)]]


def test_the_multimodal_table_scores_text_to_image_fid_and_captions(tmp_path, cache, one_thread):
    path = tmp_path / "bench.toml"
    path.write_text(f"""name = "mm"
base = "{ROOT / 'benchmarks' / 'configs' / 'shapes-multimodal.toml'}"
set = ["train.max_steps=2", "train.ckpt_every=2", "train.batch_size=8", "model.hidden_size=32",
       "data.dataset.size=200"]
[evaluation]
metrics = ["fid", "cider"]
num = 6
cfg = [3.0]
steps = 2
batch_size = 6
[[grids]]
table = "6a"
[grids.axes.method]
causalfusion-multimodal = []
transfusion = ["method.name=transfusion"]
""")
    out = tmp_path / "out"
    assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 0
    table, = json.loads((out / "results.json").read_text())["tables"]
    assert [c["metric"] for c in table["columns"]] == ["fid", "cider"]
    for row in table["rows"]:
        assert all(cell["mean"] is not None for cell in row["cells"])
    assert [row["paper"] for row in table["rows"]] == [[7.1, 47.9], [8.1, 34.5]]
    assert [t["column"] for t in table["trends"]] == ["fid ↓ S=1", "cider ↑"]
    report = (out / "report.md").read_text()
    assert "samples-method_transfusion-S1-cfg3.png" in report and "editing-" not in report
