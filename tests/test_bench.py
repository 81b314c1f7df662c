"""``cfkit bench``: grids of runs cached by config hash, the tables with 95% CIs and the paper's
numbers and trends, the report; and every config in benchmarks/ validating."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from scipy import stats

from cfkit import bench, paper
from cfkit import config as configs
from cfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "configs" / "digits-tiny.toml"


def write_bench(folder: Path, body: str, head: str = "") -> Path:
    path = folder / "bench.toml"
    path.write_text(f'name = "test"\nbase = "{BASE}"\n{head}\n{body}')
    return path


ORDERINGS = """
[[grids]]
table = "3b"
[grids.axes.ordering]
random = []
raster = ["factorisation.ordering.name=raster"]

[[grids]]
table = "3c"
[grids.axes.w_max]
"2" = []
"1" = { set = ["factorisation.ar_weighting.w_max=1.0"] }
"""


def test_grids_share_the_run_of_their_common_setting_once(tmp_path):
    _, runs = bench.load(write_bench(tmp_path, ORDERINGS, "seeds = [0, 1]"))
    # random ordering == w_max 2 == the base config: 3 distinct settings x 2 seeds
    assert len(runs) == 6
    assert len({run.key for run in runs}) == 6
    assert {run.seed for run in runs} == {0, 1}
    labels = {run.label for run in runs}
    assert labels == {"ordering=random", "ordering=raster", "w_max=1"}
    shared = [run for run in runs if run.label == "ordering=random"]
    assert all(run.rows == [(0, ("random",)), (1, ("2",))] for run in shared)


def test_a_bad_variant_names_the_run_and_the_field(tmp_path):
    body = '[[grids]]\n[grids.axes.ordering]\nsnail = ["factorisation.ordering.name=snail"]'
    words = "run ordering=snail seed 0: .*ordering.*snail.*allowed: .*random"
    with pytest.raises(configs.ConfigError, match=words):
        bench.load(write_bench(tmp_path, body))


@pytest.mark.parametrize("body, words", [
    ('[[grids]]\ntable = "9z"\n[grids.axes.a]\nx = []', "'9z' is not a paper table; allowed: 2, 3a"),
    ('[[grids]]\ntable = "3b"\n[grids.axes.a]\nx = []\n[grids.axes.b]\ny = []', "one axis, got axes a, b"),
    ('[[grids]]\n[grids.axes.a]\nx = []\n[evaluation]\nnum = 1', "evaluation.num"),
    ("", "grids"),
])
def test_bad_bench_configs_say_what_is_wrong(tmp_path, body, words):
    with pytest.raises(configs.ConfigError, match=words):
        bench.load(write_bench(tmp_path, body))


def test_every_bench_and_experiment_config_in_benchmarks_validates():
    benches = sorted((ROOT / "benchmarks").glob("*.toml"))
    names = {p.name for p in benches}
    assert names >= {"digits-mini.toml", "digits-ablations.toml", "shapes-multimodal.toml"}
    for path in benches:
        _, runs = bench.load(path)
        assert runs, path
    experiments = sorted((ROOT / "benchmarks").glob("*/*.toml"))
    assert len([p for p in experiments if p.parent.name == "imagenet"]) >= 4
    for path in experiments:
        configs.load(path)  # weights and shards named there need not exist here


def test_the_ablation_grid_covers_the_papers_ablation_tables():
    loaded, _ = bench.load(ROOT / "benchmarks" / "digits-ablations.toml")
    assert {g.table for g in loaded.grids} >= {"2", "3a", "3b", "3c", "7", "8", "6b"}
    assert len(loaded.seeds) == 3


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [0.5, 0.7], [4.0, 4.0, 4.0, 4.0]])
def test_the_confidence_interval_is_students_t(values):
    mean, half = bench.mean_ci(values)
    spread = stats.sem(values)
    low = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=spread)[0] if spread else mean
    assert mean == pytest.approx(sum(values) / len(values))
    assert half == pytest.approx(mean - low)
    assert bench.mean_ci([2.5]) == (2.5, None)


def _results(values: dict[str, float | list[float]], metric: str = "fid") -> tuple[bench.Grid, list, list]:
    """A Table 3b grid whose variants measured ``values`` (a list: one value per seed)."""
    grid = bench.Grid(table="3b", axes={"ordering": {name: bench.Variant() for name in values}})
    runs, results = [], []
    for name, measured in values.items():
        for seed, value in enumerate(measured if isinstance(measured, list) else [measured]):
            key = f"{name}-{seed}"
            runs.append(bench.Run((("ordering", name),), seed, None, key, [(0, (name,))]))
            results.append({"key": key, "records": [
                {"metric": metric, "name": "FID-10 (x)", "value": value, "ar_steps": 1, "cfg": 1.0}]})
    return grid, runs, results


@pytest.mark.parametrize("ours, holds, agree", [
    ({"random": 10.0, "raster": 12.0, "dilated": 15.0}, True, 3),
    ({"random": 13.0, "raster": 12.0, "dilated": 15.0}, False, 2),
    ({"random": 12.0, "raster": 12.0, "dilated": 15.0}, None, 2),  # a tie for best decides nothing
])
def test_the_trend_holds_when_the_papers_best_variant_is_best_here(ours, holds, agree):
    grid, runs, results = _results(ours)
    loaded = bench.Bench(name="t", base="x", grids=[grid])
    entry = bench.table(0, loaded, runs, results)
    trend, = entry["trends"]
    assert (trend["holds"], trend["pairs_agreeing"], trend["pairs"]) == (holds, agree, 3)
    assert trend["best_paper"] == "random"
    assert entry["paper"]["rows"] == [[paper.TABLES["3b"].rows[k][0]] for k in ours]
    text = bench.markdown_table(entry)
    assert "| random | 1 | " in text and "12.89" in text
    assert trend["p_best_vs_runner_up"] is None and "Welch" not in trend["line"]  # one seed: no test


@pytest.mark.parametrize("raster, significant", [([12.0, 12.5, 11.8], True), ([10.5, 14.0, 11.0], False)])
def test_the_trend_line_tests_the_best_against_the_runner_up_over_seeds(raster, significant):
    random = [10.0, 10.4, 9.9]
    grid, runs, results = _results({"random": random, "raster": raster, "dilated": [15.0, 16.0, 15.5]})
    trend, = bench.table(0, bench.Bench(name="t", base="x", grids=[grid]), runs, results)["trends"]
    p = stats.ttest_ind(random, raster, equal_var=False).pvalue
    assert (trend["holds"], trend["runner_up"]) == (True, "raster")
    assert trend["p_best_vs_runner_up"] == pytest.approx(p) and (p < 0.05) == significant
    assert trend["line"].endswith(f"(random ahead of raster: p = {p:.2g}, Welch t over seeds, "
                                  f"{'' if significant else 'not '}significant at 5%)")
    assert bench.welch_p([1.0, 1.0], [2.0, 2.0]) is None and bench.welch_p([1.0], [2.0, 3.0]) is None


def test_bench_trains_evaluates_reports_and_resumes(tmp_path, cache, one_thread, capsys, monkeypatch):
    """Two methods, two seeds: DiT cannot sample in 4 AR steps (n/a), a rerun trains nothing
    (nor makes the editing example again), a run cut short resumes from its last checkpoint and
    shards sharing a grid report every run any of them finished."""
    body = """
set = ["train.max_steps=4", "train.ckpt_every=2", "train.batch_size=8", "model.hidden_size=32",
       "model.depth=2"]
seeds = [0, 1]
[evaluation]
metrics = ["fid", "probe"]
num = 6
ar_steps = [1, 4]
steps = 2
batch_size = 6
grid_images = 4
figure4_steps = 4
[[grids]]
table = "6b"
[grids.axes.method]
causalfusion = []
dit = ["method.name=dit", "model.preset=DiT-tiny"]
"""
    path, out = write_bench(tmp_path, body), tmp_path / "out"
    assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "| method | seeds |" in printed.out and "paper fid S=1" in printed.out
    results = json.loads((out / "results.json").read_text())
    table, = results["tables"]
    rows = {row["variants"][0]: row for row in table["rows"]}
    headers = [bench._header(c) for c in table["columns"]]
    fid4 = headers.index("FID-6 (digits-cnn) S=4 cfg=1")
    assert rows["dit"]["cells"][fid4]["mean"] is None and "1 AR step" in rows["dit"]["cells"][fid4]["skipped"]
    for row in rows.values():
        assert row["seeds"] == [0, 1]
        fid1 = row["cells"][headers.index("FID-6 (digits-cnn) S=1 cfg=1")]
        assert fid1["n"] == 2 and fid1["mean"] > 0 and fid1["ci95"] is not None
    assert [t["column"] for t in table["trends"]] == ["fid S=1", "probe"]
    cf = next(r for r in results["runs"] if r["label"] == "method=causalfusion")
    sizes = cf["figure4"]["step_size_counts"]
    assert len(cf["figure4"]["validation_loss"]) == 4
    assert sum(int(k) * c for k, c in sizes.items()) == 2000 * 64  # every draw covers the 64 tokens
    assert next(r for r in results["runs"] if r["label"] == "method=dit")["figure4"] is None
    report = (out / "report.md").read_text()
    for name in ("loss_curves.png", "figure4.png", "fid_vs_s_eval-0.png", "samples-method_dit-S1-cfg1.png",
                 "samples-method_causalfusion-S4-cfg1.png", "editing-method_causalfusion.png"):
        assert (out / name).stat().st_size > 0 and f"]({name})" in report
    assert "editing-method_dit.png" not in report

    def edit_again(*args):
        raise AssertionError("the editing example of a finished run is made again")

    cached = out / cf["folder"] / "bench-eval" / results["eval_key"] / "editing.png"
    assert cached.read_bytes() == (out / "editing-method_causalfusion.png").read_bytes()
    (out / "editing-method_causalfusion.png").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(bench, "editing_example", edit_again)
        assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err.count("trained already") == 4
    assert (out / "editing-method_causalfusion.png").read_bytes() == cached.read_bytes()

    run_dir = out / cf["folder"]
    (run_dir / "checkpoints" / "step-0000004").rename(run_dir / "step-4-gone")
    assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("trained already") == 3 and "training 4 steps from step-0000002" in err
    assert (run_dir / "checkpoints" / "step-0000004").exists()

    path.write_text(path.read_text() + 'incontext-dit = ["method.name=incontext-dit"]\n')
    for bad in ("2/2", "1", "a/b"):
        assert main(["bench", str(path), "--out", str(out), "--shard", bad]) == 2
    assert "give I/N" in capsys.readouterr().err
    folders = sorted((out / "runs").iterdir())
    assert main(["bench", str(path), "--out", str(out), "--report-only", "--no-progress"]) == 0
    assert "4 of 6 runs trained and evaluated" in capsys.readouterr().err
    assert sorted((out / "runs").iterdir()) == folders  # nothing trained
    assert "4 runs of 6 (a partial report)" in (out / "report.md").read_text()
    rows = {r["variants"][0]: r for r in json.loads((out / "results.json").read_text())["tables"][0]["rows"]}
    assert rows["incontext-dit"]["seeds"] == [] and rows["causalfusion"]["seeds"] == [0, 1]

    # Shard 1/2 takes runs 2, 4, 6 (1-based): only in-context DiT's seed 1 (run 6) is new. While
    # it trains run 6, shard 0/2 finishes run 5, and the report of the last one has both.
    train_run = bench.train_run

    def other_shard_meanwhile(run, *args, **kwargs):
        if run.seed == 1 and "incontext" in run.label:
            assert main(["bench", str(path), "--out", str(out), "--shard", "0/2", "--no-progress"]) == 0
        return train_run(run, *args, **kwargs)

    monkeypatch.setattr(bench, "train_run", other_shard_meanwhile)
    assert main(["bench", str(path), "--out", str(out), "--shard", "1/2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("[6/6] method=incontext-dit, seed 1") == 1 and err.count("[5/6]") == 1
    rows = {r["variants"][0]: r for r in json.loads((out / "results.json").read_text())["tables"][0]["rows"]}
    assert rows["incontext-dit"]["seeds"] == [0, 1]


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


def test_cfkit_bench_perf_runs_the_perf_report_with_its_size_and_folder(monkeypatch, tmp_path):
    import runpy

    called = {}

    def run_path(path):
        called["path"] = path
        return {"main": lambda argv: called.setdefault("argv", argv) and 0}

    monkeypatch.setattr(runpy, "run_path", run_path)
    assert main(["bench", "--perf", "--size", "tiny", "--out", str(tmp_path)]) == 0
    assert called == {"path": str(ROOT / "benchmarks" / "perf" / "run_all.py"),
                      "argv": ["--size", "tiny", "--out", str(tmp_path)]}


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
    assert table["paper"]["rows"] == [[7.1, 47.9], [8.1, 34.5]]
    assert [t["column"] for t in table["trends"]] == ["fid S=1", "cider"]
    report = (out / "report.md").read_text()
    assert "samples-method_transfusion-S1-cfg3.png" in report and "editing-" not in report
