"""cfkit.bench.report from stored run files, without training: the tables, header, trend
lines, baseline rows and warnings, plots, and the report files replaced together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfkit import bench
from cfkit.bench import plots, report
from cfkit.bench.schema import EDIT_ROWS, Overrides, baseline_folder, eval_folder

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "configs" / "digits-tiny.toml"
BODY = """
set = ["train.max_steps=600"]
[evaluation]
metrics = ["fid", "probe", "heldout-loss"]
ar_steps = [1, 4]
baselines = ["independent-pixels", "context-blind-ar"]
[[grids]]
table = "6b"
[grids.axes.method]
causalfusion = []
dit = ["method.name=dit", "model.preset=DiT-tiny"]
"""
EQUAL_COMPUTE = """
[[grids]]
table = "6b"
equal_compute = true
[grids.axes.method]
causalfusion = []
dit = ["method.name=dit", "model.preset=DiT-tiny"]
"""
# method -> seed -> (FID at S=1, probe top-1, held-out loss at S=4)
MEASURED = {"causalfusion": {0: (20.0, 0.90, 0.50), 1: (21.0, 0.91, 0.52)},
            "dit": {0: (30.0, 0.85, None), 1: (31.5, 0.87, None)}}
BASELINE_FID = {"independent-pixels": 90.0, "context-blind-ar": 25.0}


def fid(value, s, cfg=1.0):
    return {"metric": "fid", "name": "FID-500 (digits-cnn)", "value": value, "ar_steps": s, "cfg": cfg}


def records(method: str, seed: int) -> list[dict]:
    fid1, probe, heldout = MEASURED[method][seed]
    out = [fid(fid1, 1)]
    if method == "dit":
        out += [{"metric": "fid", "name": None, "value": None, "ar_steps": 4, "cfg": 1.0,
                 "skipped": "DiT samples in 1 AR step"},
                {"metric": "heldout-loss", "name": None, "value": None, "ar_steps": 4, "cfg": None,
                 "skipped": "no AR steps"}]
    else:
        out += [fid(fid1 - 2, 4)]
        loss = [("held-out ε-MSE", heldout), ("held-out ε-MSE ±95%", 0.02)]
        loss += [(f"held-out ε-MSE, AR step {k}/4", heldout + 0.1 * (4 - k)) for k in range(1, 5)]
        out += [{"metric": "heldout-loss", "name": name, "value": value, "ar_steps": 4, "cfg": None}
                for name, value in loss]
    return out + [{"metric": "probe", "name": "linear probe top-1 (t=0)", "value": probe, "ar_steps": None,
                   "cfg": None}]


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def fake_bench(tmp_path: Path, seeds=(0, 1), body: str = BODY):
    """A bench whose runs left the files training and evaluation leave, made up."""
    path = tmp_path / "bench.toml"
    path.write_text(f'name = "fake"\nbase = "{BASE}"\nseeds = {list(seeds)}\n{body}')
    loaded, runs = bench.load(path, ["evaluation.num=500"])
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    for run in runs:
        method = run.variants[0][1]
        folder = run.folder(out)
        write_json(folder / "bench-run.json", {
            "key": run.key, "label": run.label, "seed": run.seed, "max_steps": run.experiment.train.max_steps,
            "train_seconds": 12.5,
            "train_flops": 1.5e12 if method == "causalfusion" else 1.0e12, "attention_counted": "mask",
            "machine": {"device": "cpu", "cpu_capability": "AVX2", "threads": 2}})
        (folder / "metrics.csv").write_text("step,loss\n10,0.9\n20,0.5\n30,0.4\n")
        evaluated = eval_folder(folder, loaded.evaluation)
        write_json(evaluated / "feature-network.json", {"name": "digits-cnn", "held_out_accuracy": 0.975})
        write_json(evaluated / "figure4.json", None if method == "dit" else
                   {"step_size_counts": {"1": 30, "8": 10, "64": 5}, "draws": 20, "num_tokens": 64})
        labels = np.arange(20) % 10
        images = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
        np.savez(_file(evaluated / "cfg1" / "samples-S1.npz"), arr_0=images, labels=labels)
        if method == "dit":
            (evaluated / "editing-none.txt").write_text("this model cannot edit\n")
        else:
            rows = {name: images[:4] for name in EDIT_ROWS}
            np.savez(_file(evaluated / "editing.npz"), labels=labels[:4], new_labels=(labels[:4] + 1) % 10,
                     **rows)
        write_json(evaluated / "records.json", records(method, run.seed))
    for name, value in BASELINE_FID.items():
        write_json(baseline_folder(out, name, runs[0].experiment, loaded.evaluation) / "records.json",
                   [{**fid(value, s, None), "baseline": name} for s in (1, 4)])
    return path, loaded, runs, out


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write(path, loaded, runs, out, **options):
    return report.write_report(path, loaded, runs, out, Overrides.split(["evaluation.num=500"]),
                               started=0.0, **options)


def test_the_report_is_built_from_the_run_files_alone(tmp_path, monkeypatch):
    path, loaded, runs, out = fake_bench(tmp_path)
    from cfkit.bench import runner

    def no_work(*args, **kwargs):
        raise AssertionError("the report trains or evaluates")

    for name in ("train_run", "evaluate_run", "score_baselines", "editing_example"):
        monkeypatch.setattr(runner, name, no_work)
    results = write(path, loaded, runs, out)
    table, = results["tables"]
    headers = [c["header"] for c in table["columns"]]
    assert headers == ["FID-500 (digits-cnn) ↓ S=1 cfg=1", "FID-500 (digits-cnn) ↓ S=4 cfg=1",
                       "held-out ε-MSE ↓ S=4", "linear probe top-1 (t=0) ↑"]
    rows = {row["label"]: row for row in table["rows"]}
    assert [row["kind"] for row in table["rows"]] == ["model", "model", "baseline", "baseline"]
    assert rows["dit"]["cells"][1]["mean"] is None and "1 AR step" in rows["dit"]["cells"][1]["skipped"]
    assert rows["causalfusion"]["cells"][0]["mean"] == 20.5 and rows["causalfusion"]["train_flops"] == 1.5e12
    assert rows["context-blind-ar"]["cells"][:2] == [
        {"mean": 25.0, "ci95": None, "n": 1, "values": [25.0], "seeds": [0], "skipped": None}] * 2
    assert rows["context-blind-ar"]["cells"][3]["mean"] is None  # a baseline has no model metrics
    fid1, probe = table["trends"]
    assert (fid1["column"], fid1["verdict"], fid1["paper_best"], fid1["best_here"]) == (
        "fid ↓ S=1", "not resolvable", "causalfusion", ["causalfusion"])
    # causalfusion leads dit significantly, but dit does not beat the context-blind sampler
    assert "dit do(es) not beat the structure-blind baselines" in fid1["line"]
    assert probe["verdict_text"] == "not resolvable with 2 seeds"
    assert table["warnings"] == ["dit does not beat context-blind-ar (25) on FID-500 (digits-cnn) ↓ S=1 "
                                 "cfg=1 (30.8)"]
    assert table["paper"]["columns"] == ["fid ↓ S=1", "probe ↑"]

    text = (out / "report.md").read_text()
    for words in ("| dataset | digits |", "600 training steps, batch 32", "`evaluation.num=500`",
                  "`train.max_steps=600`", "digits-cnn, held-out accuracy 97.5%",
                  "| machine | CPU (AVX2), 2 torch threads |",
                  "FID/KID against the val split",
                  "| baselines | independent-pixels, context-blind-ar (8 AR steps) |",
                  "| paper (ImageNet 256): | fid ↓ S=1 | probe ↑ |", "| *baseline:* context-blind-ar | — |",
                  "- ⚠ dit does not beat context-blind-ar", f"- {fid1['line']}",
                  "- fid ↓ S=1: not resolvable with 2 seeds. Best in",
                  "| **0.510 ± 0.127** |", "| method=dit | 1 | 600 | 12.50 | 1e+12 |"):
        assert words in text, words
    assert text.rstrip().endswith(f"<!-- report_id: {results['report_id']} -->")
    assert json.loads((out / "results.json").read_text())["report_id"] == results["report_id"]
    for name in ("loss_curves.png", "figure4.png", "fid_vs_s_eval-0.png", "samples-method_dit-S1-cfg1.png",
                 "samples-method_causalfusion-S1-cfg1.png", "editing-method_causalfusion.png"):
        assert (out / name).stat().st_size > 0 and f"]({name})" in text, name
    assert "editing-method_dit" not in text
    assert sorted(results["files"]) == sorted(p.name for p in out.glob("*.png"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no report folder left


def test_one_seed_shows_a_records_own_interval(tmp_path):
    path, loaded, runs, out = fake_bench(tmp_path, seeds=(0,))
    results = write(path, loaded, runs, out)
    row = next(r for r in results["tables"][0]["rows"] if r["label"] == "causalfusion")
    assert row["cells"][2]["mean"] == 0.5 and row["cells"][2]["ci95"] == 0.02
    assert "| **0.500 ± 0.020** |" in (out / "report.md").read_text()
    assert results["tables"][0]["trends"][0]["verdict_text"] == "not resolvable with 1 seed"


def test_a_failure_while_writing_leaves_the_previous_pair(tmp_path, monkeypatch):
    path, loaded, runs, out = fake_bench(tmp_path)
    first = write(path, loaded, runs, out)
    before = {name: (out / name).read_bytes() for name in ("results.json", "report.md")}

    def broken(*args, **kwargs):
        raise RuntimeError("killed while writing report.md")

    for module, where in ((report, "markdown"), (plots, "figure4")):
        with monkeypatch.context() as patch:
            patch.setattr(module, where, broken)
            with pytest.raises(RuntimeError, match="killed"):
                write(path, loaded, runs, out)
        assert {name: (out / name).read_bytes() for name in before} == before
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads(before["results.json"])["report_id"] == first["report_id"]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    return int(done.stdout)


def test_a_kill_during_the_renames_is_finished_and_an_unfinished_write_discarded(tmp_path, monkeypatch):
    path, loaded, runs, out = fake_bench(tmp_path)
    old = write(path, loaded, runs, out)
    # a process killed after writing every file and its marker, having renamed one PNG only
    moved, replace, dead = [], os.replace, _dead_pid()

    def killed(src, dst):
        if Path(dst).parent.resolve() == out.resolve():
            if moved:
                raise KeyboardInterrupt  # no clean-up runs: the folder and its marker stay
            moved.append(dst)
        replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(report.os, "replace", killed)
        patch.setattr(report.os, "getpid", lambda: dead)
        with pytest.raises(KeyboardInterrupt):
            write(path, loaded, runs, out)
    left, = [p for p in tmp_path.iterdir() if p.name.startswith(".out.report-")]
    assert (left / report.COMPLETE).exists()
    assert json.loads((out / "results.json").read_text())["report_id"] == old["report_id"]
    new_id = json.loads((left / "results.json").read_text())["report_id"]
    assert len(moved) == 1 and Path(moved[0]).suffix == ".png"
    unfinished = tmp_path / f".out.report-{report.socket.gethostname()}-{dead}-0000"
    unfinished.mkdir()
    (unfinished / "results.json").write_text("{}")  # no marker: never complete
    report.recover(out)
    assert json.loads((out / "results.json").read_text())["report_id"] == new_id
    assert f"<!-- report_id: {new_id} -->" in (out / "report.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_equal_compute_table_says_so_and_gives_each_rows_steps(tmp_path):
    path, loaded, runs, out = fake_bench(tmp_path, seeds=(0,), body=BODY + EQUAL_COMPUTE)
    results = write(path, loaded, runs, out)
    same_steps, same_compute = results["tables"]
    assert not same_steps["title"].endswith("compute") and same_steps["note"] == ""
    assert same_compute["title"].endswith(", at equal training compute")
    assert "match those of causalfusion's 600 steps" in same_compute["note"]
    steps = {row["label"]: row["steps"] for row in same_compute["rows"] if row["kind"] == "model"}
    dit, = [run for run in runs if run.note]
    assert steps == {"causalfusion": 600, "dit": dit.experiment.train.max_steps} and steps["dit"] > 600
    text = (out / "report.md").read_text()
    assert same_compute["note"] in text and f"| dit | 1 | {steps['dit']} |" in text
    assert f"(equal compute: {steps['dit']} steps)" in text  # the run's label in the runs table
