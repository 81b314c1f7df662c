"""cfkit.bench.stats on constructed tables (no training): paired comparisons, verdicts, the
minimum detectable effect, the best row here, baseline warnings and cells from records."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from cfkit.bench import stats
from cfkit.bench.stats import Cell, Column, PaperColumn, Row

FID = Column("fid", "FID-10 (x)", 1, 1.0, "lower")
PROBE = Column("probe", "linear probe top-1 (t=0)", None, None, "higher")


def row(label: str, values, paper: float | None = None, kind: str = "model", seeds=None) -> Row:
    values = tuple(values if isinstance(values, list | tuple) else [values])
    seeds = tuple(range(len(values)) if seeds is None else seeds)
    return Row(label, (Cell(values, seeds),), (paper,), kind, seeds if kind == "model" else ())


def table(*rows: Row, column: Column = FID) -> stats.Table:
    return stats.make_table("t", ("ordering",), (column,), rows, "3b",
                            (PaperColumn(column.metric, column.ar_steps, column.better, 0),),
                            must_beat=("independent-pixels", "context-blind-ar"))


def test_a_pair_holds_when_the_papers_best_is_significantly_better_over_paired_seeds():
    random, raster = [10.0, 10.4, 9.9], [12.0, 12.5, 11.8]
    trend, = table(row("random", random, 12.89), row("raster", raster, 14.46)).trends
    pair, = trend.pairs
    differences = [b - a for a, b in zip(random, raster, strict=True)]
    scale = sum(random) / 3
    assert (pair.other, pair.seeds, pair.verdict) == ("raster", (0, 1, 2), "holds")
    assert pair.p == pytest.approx(scipy_stats.ttest_rel(raster, random).pvalue)
    assert pair.mean == pytest.approx(sum(differences) / 3 / scale)
    sem = scipy_stats.sem(differences)
    assert pair.ci95 == pytest.approx(scipy_stats.t.ppf(0.975, 2) * sem / scale)
    expected_mde = (scipy_stats.t.ppf(0.975, 2) + scipy_stats.t.ppf(0.8, 2)) * sem / scale
    assert pair.mde == pytest.approx(expected_mde)
    assert pair.paper_effect == pytest.approx((14.46 - 12.89) / 12.89)
    assert trend.verdict == "holds" and trend.best_here == ("random",) and trend.paper_best == "random"
    assert trend.line.startswith("fid ↓ S=1: holds. Best in the paper random, best here random (of 2 rows)")
    assert "1/1 pairs hold: vs raster: holds (ahead by" in trend.line


def test_a_pair_fails_when_the_papers_best_is_significantly_beaten():
    trend, = table(row("random", [13.0, 13.4, 12.9], 12.89), row("raster", [10.0, 10.5, 9.8], 14.46),
                   row("dilated", [15.0, 15.9, 14.7], 15.54)).trends
    verdicts = {pair.other: pair.verdict for pair in trend.pairs}
    assert verdicts == {"raster": "fails", "dilated": "holds"}
    assert trend.verdict == "fails" and trend.best_here == ("raster",)
    assert "vs raster: fails (behind by" in trend.line


def test_a_large_spread_against_a_small_paper_effect_is_not_resolvable():
    # the paper: 12.13 against 12.32, 1.6%; here seeds disagree by far more
    trend, = table(row("2", [10.0, 14.0, 12.0], 12.13), row("2.5", [13.0, 9.0, 12.5], 12.32)).trends
    pair, = trend.pairs
    assert pair.p > 0.05 and pair.mde > pair.paper_effect == pytest.approx((12.32 - 12.13) / 12.13)
    assert pair.verdict == "not resolvable" and pair.verdict_text == "not resolvable with 3 seeds"
    assert trend.verdict_text == "not resolvable with 3 seeds"
    assert "more seeds needed" in trend.line


def test_no_significant_difference_where_the_run_could_see_the_papers_effect_fails():
    # the paper: raster 12% worse than random; here seeds agree to 0.1%, no difference shows
    trend, = table(row("random", [10.0, 10.01, 9.99], 12.89),
                   row("raster", [10.01, 9.99, 10.0], 14.46)).trends
    pair, = trend.pairs
    assert pair.p > 0.05 and pair.mde < pair.paper_effect
    assert pair.verdict == "fails" and trend.verdict == "fails"
    assert "which would likely have shown" in trend.line


def test_a_pair_with_a_row_below_a_structure_blind_baseline_is_not_resolvable():
    rows = (row("random", [10.0, 10.1, 9.9], 12.89), row("raster", [12.0, 12.2, 11.9], 14.46))
    clear, = table(*rows).trends
    blind, = table(*rows, row("context-blind-ar", 11.0, kind="baseline")).trends
    assert clear.verdict == "holds" and blind.verdict == "not resolvable"
    assert blind.pairs[0].verdict_text.startswith("not resolvable (a row does not beat")
    assert "raster do(es) not beat the structure-blind baselines" in blind.line


def test_one_seed_gives_no_test_and_resolves_nothing():
    trend, = table(row("random", 10.0, 12.89), row("raster", 12.0, 14.46)).trends
    pair, = trend.pairs
    assert (pair.p, pair.mde, pair.ci95) == (None, None, None)
    assert pair.verdict_text == "not resolvable with 1 seed"
    assert pair.mean == pytest.approx(0.2)
    assert "one seed: no test" in trend.line
    assert trend.line.startswith("fid ↓ S=1: not resolvable with 1 seed.")


def test_ties_name_every_best_row_and_equal_seeds_show_no_effect():
    trend, = table(row("random", [10.0, 11.0], 12.89), row("raster", [10.0, 11.0], 14.46),
                   row("dilated", [12.0, 13.0], 15.54)).trends
    assert trend.best_here == ("random", "raster")
    pairs = {pair.other: pair for pair in trend.pairs}
    # identical at every seed: no spread, so an effect of the paper's 12% would have shown
    assert pairs["raster"].p == 1.0 and pairs["raster"].mde == 0 and pairs["raster"].verdict == "fails"
    # the same difference at every seed: certain, though the t statistic is undefined
    assert pairs["dilated"].p == 0.0 and pairs["dilated"].verdict == "holds"
    assert "best here random = raster" in trend.line


def test_pairs_match_seeds_and_compare_with_rows_the_paper_lacks():
    best = row("causalfusion", [10.0, 11.0, 12.0], 11.8)
    partial = row("dit", [13.0, 14.5], 18.2, seeds=(1, 2))
    unpublished = row("incontext-dit", [9.0, 10.1, 10.9], None)
    trend, = table(best, partial, unpublished).trends
    pairs = {pair.other: pair for pair in trend.pairs}
    assert pairs["dit"].seeds == (1, 2)
    assert pairs["dit"].p == pytest.approx(scipy_stats.ttest_rel([13.0, 14.5], [11.0, 12.0]).pvalue)
    assert pairs["incontext-dit"].paper_effect is None and pairs["incontext-dit"].verdict == "fails"
    assert trend.best_here == ("incontext-dit",) and trend.seeds == 2


def test_higher_is_better_flips_the_direction():
    column = Column("probe", "top-1", None, None, "higher")
    trend, = table(row("causalfusion", [0.90, 0.91, 0.92], 0.842), row("dit", [0.80, 0.82, 0.81], 0.835),
                   column=column).trends
    pair, = trend.pairs
    assert pair.verdict == "holds" and pair.mean > 0 and pair.paper_effect == pytest.approx(0.007 / 0.842)
    assert trend.best_here == ("causalfusion",)


@given(st.lists(st.lists(st.sampled_from([8.0, 9.0, 10.0, 11.0, 12.5]), min_size=2, max_size=2),
                min_size=2, max_size=6),
       st.lists(st.booleans(), min_size=6, max_size=6))
def test_the_trend_names_as_best_here_exactly_the_best_trained_rows_of_the_table(values, in_paper):
    rows = [row(f"r{i}", v, 10.0 + i if in_paper[i] or i == 0 else None) for i, v in enumerate(values)]
    rows.append(row("independent-pixels", 1.0, kind="baseline"))  # a baseline is never "best here"
    built = table(*rows)
    means = {r.label: sum(r.cells[0].values) / 2 for r in rows if r.kind == "model"}
    lowest = min(means.values())
    expected = tuple(label for label, mean in means.items() if math.isclose(mean, lowest))
    trend, = built.trends
    assert trend.best_here == expected == stats.best_rows(built.rows, 0, "lower")
    assert f"best here {' = '.join(expected)} " in trend.line


def test_the_minimum_detectable_effect_is_the_paired_t_formula():
    assert stats.mde(2.0, 5) == pytest.approx(
        (scipy_stats.t.ppf(0.975, 4) + scipy_stats.t.ppf(0.8, 4)) * 2.0 / math.sqrt(5))
    with pytest.raises(ValueError, match="at least two"):
        stats.mde(1.0, 1)


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [0.5, 0.7], [4.0, 4.0, 4.0, 4.0]])
def test_the_confidence_interval_is_students_t(values):
    mean, half = stats.mean_ci(values)
    spread = scipy_stats.sem(values)
    low = scipy_stats.t.interval(0.95, len(values) - 1, loc=mean, scale=spread)[0] if spread else mean
    assert mean == pytest.approx(sum(values) / len(values))
    assert half == pytest.approx(mean - low)
    assert stats.mean_ci([2.5]) == (2.5, None)


def test_a_model_that_does_not_beat_both_structure_blind_baselines_is_named():
    built = table(row("causalfusion", [10.0, 11.0], 11.8), row("dit", [30.0, 31.0], 18.2),
                  row("independent-pixels", 40.0, kind="baseline"),
                  row("context-blind-ar", 20.0, kind="baseline"),
                  row("real-train", 1.0, kind="baseline"))
    assert built.warnings == ("dit does not beat context-blind-ar (20) on FID-10 (x) ↓ S=1 cfg=1 (30.5)",)
    trend, = built.trends
    assert {pair.other for pair in trend.pairs} == {"dit"}  # baselines are not compared


def test_columns_skip_intervals_and_per_ar_step_records_and_cells_take_their_own_interval():
    loss = {"metric": "heldout-loss", "ar_steps": 4, "cfg": None}
    records = [{**loss, "name": "held-out ε-MSE", "value": 0.5},
               {**loss, "name": "held-out ε-MSE ±95%", "value": 0.02},
               {**loss, "name": "held-out ε-MSE, AR step 1/4", "value": 0.7},
               {"metric": "fid", "name": None, "value": None, "ar_steps": 4, "cfg": 1.0,
                "skipped": "1 AR step"}]
    columns = stats.columns_of(records, lambda metric: "lower")
    assert [c.header for c in columns] == ["held-out ε-MSE ↓ S=4", "fid ↓ S=4 cfg=1"]
    one = stats.cell({0: records}, columns[0])
    assert (one.mean, one.ci95) == (0.5, 0.02)
    two = stats.cell({0: records, 1: [{**r, "value": 0.6} if r["name"] == "held-out ε-MSE" else r
                                      for r in records]}, columns[0])
    assert two.ci95 == pytest.approx(stats.mean_ci([0.5, 0.6])[1])  # over seeds
    skipped = stats.cell({0: records}, columns[1])
    assert skipped.mean is None and skipped.skipped == "1 AR step"


def test_a_spread_column_says_neither_lower_nor_higher_is_better():
    assert Column("kid", "KID-500 std (net)", 1, 4.0, "lower").header == "KID-500 std (net) S=1 cfg=4"
    assert Column("kid", "KID-500 (net)", 1, 4.0, "lower").header == "KID-500 (net) ↓ S=1 cfg=4"


def test_a_paper_column_matches_the_first_cfg_scale_or_a_model_metric():
    columns = (Column("fid", "FID", 1, 3.0, "lower"), Column("fid", "FID", 1, 1.0, "lower"), PROBE)
    matched = stats.paper_columns(columns, (("fid", 1), ("probe", None), ("fid", 8)), lambda m: "lower", 1.0)
    assert [c.column for c in matched] == [1, 2, None]
    assert stats.trend(stats.Table("t", ("a",), columns, (), paper_columns=matched), 2).line == (
        "fid ↓ S=8: not measured here")


@pytest.mark.parametrize("n, ranks, level", [
    (5, (1, 5), 0.9375),  # too few for 95%: the full range and its coverage
    (6, (1, 6), 1 - 2 / 64),
    (9, (2, 8), 1 - 2 * 10 / 512),
    (30, (10, 21), 0.9572),  # the textbook order statistics of n = 30
])
def test_the_median_interval_is_the_narrowest_pair_of_order_statistics_of_the_level(n, ranks, level):
    values = [float(v) for v in range(n, 0, -1)]  # any order: the interval sorts them
    interval = stats.median_interval(values)
    assert (interval.low, interval.high, interval.n) == (float(ranks[0]), float(ranks[1]), n)
    assert interval.level == pytest.approx(level, abs=1e-4)
    assert interval.level >= 0.95 or n <= 5
    assert stats.median_interval([1.0]) is None


def test_the_median_interval_covers_the_true_median_as_often_as_its_level_says():
    rng = np.random.default_rng(0)
    draws = rng.exponential(size=(4000, 9))  # skewed: a t interval of the mean would not fit
    intervals = [stats.median_interval(list(d)) for d in draws]
    covered = np.mean([i.low <= math.log(2) <= i.high for i in intervals])
    assert covered == pytest.approx(intervals[0].level, abs=0.015)  # 0.961 exactly, by binomial
