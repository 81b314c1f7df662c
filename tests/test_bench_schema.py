"""cfkit.bench.schema: bench configs, their runs cached by experiment hash, evaluation
overrides, equal-compute rows, and every config in benchmarks/ validating."""

from __future__ import annotations

from pathlib import Path

import pytest

from cfkit import bench
from cfkit import config as configs
from cfkit.bench.schema import Overrides
from cfkit.flops import training_flops

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
    ('[[grids]]\n[grids.axes.a]\nx = []\n[evaluation]\nbaselines = ["noise"]',
     "unknown baseline.*'noise'.*allowed: real-train"),
    ('[[grids]]\n[grids.axes.a]\nx = []\n[evaluation]\nar_steps = [1, 2]\nfigure4_steps = 8',
     "figure4_steps: 8 is not an S_eval of the model metrics; allowed: 1, 2"),
    ('[[grids]]\n[grids.axes.a]\nx = []\n[evaluation]\nreference_split = "test"', "reference_split"),
    ('[[grids]]\nequal_compute = true\ncompute_reference = "z"\n[grids.axes.a]\nx = []',
     "compute_reference: 'z' is not a variant; allowed: x"),
    ("", "grids"),
])
def test_bad_bench_configs_say_what_is_wrong(tmp_path, body, words):
    with pytest.raises(configs.ConfigError, match=words):
        bench.load(write_bench(tmp_path, body))


def test_evaluation_overrides_change_the_evaluation_and_the_others_every_experiment(tmp_path):
    path = write_bench(tmp_path, ORDERINGS)
    plain, runs = bench.load(path)
    loaded, changed = bench.load(path, ["evaluation.num=7", "evaluation.split_steps=true",
                                        'evaluation.baselines=["independent-pixels"]', "train.max_steps=3"])
    assert (loaded.evaluation.num, loaded.evaluation.split_steps) == (7, True)
    assert loaded.evaluation.baselines == ["independent-pixels"]
    assert loaded.evaluation.reference_split == "val"
    assert loaded.evaluation.key != plain.evaluation.key
    assert {run.experiment.train.max_steps for run in changed} == {3}
    assert [r.experiment.train.max_steps for r in runs] != [3] * len(runs)
    assert Overrides.split(["evaluation.num=7", "seed=1"]) == Overrides(("seed=1",), ("num=7",))
    assert Overrides(("seed=1",), ("num=7",)).given() == ["seed=1", "evaluation.num=7"]
    with pytest.raises(configs.ConfigError, match="evaluation.nmu: unknown key"):
        bench.load(path, ["evaluation.nmu=7"])


def test_equal_compute_rows_train_the_steps_of_the_reference_rows_flops(tmp_path):
    body = """
set = ["train.max_steps=100"]
[[grids]]
table = "6b"
[grids.axes.method]
causalfusion = []
dit = ["method.name=dit", "model.preset=DiT-tiny"]

[[grids]]
table = "6b"
equal_compute = true
[grids.axes.method]
causalfusion = []
dit = ["method.name=dit", "model.preset=DiT-tiny"]
"""
    loaded, runs = bench.load(write_bench(tmp_path, body))
    assert len(runs) == 3  # the reference row is the same run in both grids
    by_label = {run.label.split(" (")[0] + (" equal" if run.note else ""): run for run in runs}
    reference, dit = by_label["method=causalfusion"], by_label["method=dit equal"]
    assert reference.rows == [(0, ("causalfusion",)), (1, ("causalfusion",))]
    budget = training_flops(reference.experiment).total
    steps = dit.experiment.train.max_steps
    assert steps == round(budget / training_flops(dit.experiment).per_step) and steps > 100
    assert dit.label == f"method=dit (equal compute: {steps} steps)"
    assert by_label["method=dit"].experiment.train.max_steps == 100
    assert loaded.grids[1].reference_variant == "causalfusion"


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


def test_the_ablation_grid_covers_the_papers_ablation_tables_and_6b_at_equal_compute():
    loaded, _ = bench.load(ROOT / "benchmarks" / "digits-ablations.toml")
    assert {g.table for g in loaded.grids} >= {"2", "3a", "3b", "3c", "7", "8", "6b"}
    assert [g.equal_compute for g in loaded.grids if g.table == "6b"] == [False, True]
    assert len(loaded.seeds) == 3
