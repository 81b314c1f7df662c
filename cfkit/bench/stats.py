"""The statistics of a bench report, on typed tables: no files, no torch.

A ``Table`` has ``Column``s (a metric record's name at one S_eval and CFG scale, and whether
lower or higher is better) and ``Row``s (a variant, or a baseline) of ``Cell``s (the values of
that row's seeds). Seeds are paired (``cfkit.bench.schema``): seed i of every row shares its
initialisation, data order and evaluation noise, so two rows are compared through their
per-seed differences.

For each column of the paper's table, ``trend`` compares the row best in the paper against
each other row (``Pair``): the paired difference over the seeds both have, its mean and 95%
Student-t interval, the paired t-test (``scipy.stats.ttest_rel``) and the minimum detectable
effect at 80% power and 5% two-sided, ``(t_{0.975,n-1} + t_{0.8,n-1}) * sd / sqrt(n)``; all
relative to the best row's mean here, beside the paper's relative difference. Verdicts:

- a pair *holds* when the difference is significant (p < 0.05) in the paper's direction (the
  paper's best is better here too);
- a pair *fails* when it is significant in the opposite direction (the paper's best is
  significantly beaten), or when it is not significant although the run had the power to
  see an effect of the paper's size in the paper's direction (MDE <= the paper's effect):
  an effect that large would likely have shown;
- otherwise it is *not resolvable with N seeds*: one seed (no test), or p >= 0.05 with an
  MDE above the paper's effect (or no paper effect to compare with): more seeds needed.

A column *fails* when any pair fails, *holds* when every pair holds, and is otherwise not
resolvable with N seeds (N: the fewest paired seeds of a pair). Its line also names the best
row here among every trained row of the table, so it never contradicts the table.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Better = Literal["lower", "higher"]
ALPHA, POWER = 0.05, 0.8
HOLDS, FAILS, UNRESOLVED = "holds", "fails", "not resolvable"
ARROWS = {"lower": "↓", "higher": "↑"}
# Record names that are not columns: a value's own 95% half-width, and per-AR-step values.
INTERVAL_SUFFIX = " ±95%"
PER_AR_STEP = re.compile(r"^(?P<name>.*), AR step (?P<step>\d+)/(?P<steps>\d+)$")


@dataclass(frozen=True)
class Column:
    """A measured column: the record ``name`` of ``metric`` at ``ar_steps`` and ``cfg`` (None:
    not a setting of it)."""

    metric: str
    name: str | None
    ar_steps: int | None
    cfg: float | None
    better: Better = "higher"

    @property
    def spread(self) -> bool:
        """A spread of another column's value (e.g. KID's std over subsets), not a score."""
        return self.name is not None and " std " in f" {self.name} "

    @property
    def header(self) -> str:
        text = self.name or self.metric
        if not self.spread:
            text += f" {ARROWS[self.better]}"
        if self.ar_steps is not None:
            text += f" S={self.ar_steps}"
        if self.cfg is not None:
            text += f" cfg={self.cfg:g}"
        return text


@dataclass(frozen=True)
class Cell:
    """The values of one row in one column, one per seed (``seeds``, same order); ``skipped``
    why the setting has no value; ``interval`` the 95% half-width a single seed's record gives
    itself (e.g. the held-out loss over its images)."""

    values: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()
    skipped: str | None = None
    interval: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return mean_ci(self.values)[0] if self.values else None

    @property
    def ci95(self) -> float | None:
        """Half-width of the 95% interval: Student t over the seeds, or with one seed the
        record's own interval (None without one)."""
        if self.n >= 2:
            return mean_ci(self.values)[1]
        return self.interval if self.n == 1 else None

    def by_seed(self) -> dict[int, float]:
        return dict(zip(self.seeds, self.values, strict=True))


@dataclass(frozen=True)
class Row:
    """A row: ``label`` (its variants, or a baseline's name), its ``cells`` (one per column),
    its values in the paper's columns (None where the paper has none), what trained it."""

    label: str
    cells: tuple[Cell, ...]
    paper: tuple[float | None, ...] = ()
    kind: Literal["model", "baseline"] = "model"
    seeds: tuple[int, ...] = ()
    steps: int | None = None
    train_flops: float | None = None


@dataclass(frozen=True)
class PaperColumn:
    """A column of the paper's table: ``metric`` at ``ar_steps`` (None: of the model), and
    the index of the measured column it is compared with (None: not measured here)."""

    metric: str
    ar_steps: int | None
    better: Better
    column: int | None

    @property
    def label(self) -> str:
        text = f"{self.metric} {ARROWS[self.better]}"
        return text + (f" S={self.ar_steps}" if self.ar_steps is not None else "")


@dataclass(frozen=True)
class Pair:
    """The paper's best row against ``other`` in one column, over the seeds both have.
    ``mean``/``ci95``/``mde``: of the advantage of the best row (positive: the best row is
    better here, the paper's direction), relative to the best row's mean here;
    ``paper_effect`` the same advantage in the paper's numbers (None: the paper has no
    value for ``other``)."""

    other: str
    seeds: tuple[int, ...]
    mean: float
    ci95: float | None
    p: float | None
    mde: float | None
    paper_effect: float | None
    verdict: str
    blind: bool = False  # a row of the pair does not beat the structure-blind baselines

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def verdict_text(self) -> str:
        if self.blind:
            return "not resolvable (a row does not beat the structure-blind baselines)"
        return verdict_text(self.verdict, self.n)

    def text(self) -> str:
        interval = "" if self.ci95 is None else f" ± {self.ci95:.1%}"
        lead = f"{'ahead' if self.mean >= 0 else 'behind'} by {abs(self.mean):.1%}{interval}"
        test = "one seed: no test" if self.p is None else f"p = {self.p:.2g}"
        paper = "" if self.paper_effect is None else f", paper {self.paper_effect:.1%}"
        power = ""
        if self.mde is not None:
            power = f", MDE {self.mde:.1%}"
            if not self.blind and self.p is not None and self.p >= ALPHA and self.paper_effect is not None:
                power += (" > the paper's effect: more seeds needed" if self.mde > self.paper_effect
                          else " <= the paper's effect, which would likely have shown")
        return f"vs {self.other}: {self.verdict_text} ({lead}, {test}{power}{paper})"


@dataclass(frozen=True)
class Trend:
    """One paper column here: the paper's best row, the best rows here (every trained row;
    several when tied), each pair's comparison and the column's verdict."""

    column: str
    paper_best: str | None
    best_here: tuple[str, ...]
    pairs: tuple[Pair, ...]
    verdict: str | None  # None: no comparison
    seeds: int
    line: str

    @property
    def verdict_text(self) -> str:
        return "no comparison" if self.verdict is None else verdict_text(self.verdict, self.seeds)


@dataclass(frozen=True)
class Table:
    """A grid as a table: its rows and columns, and, for a paper table, the paper's columns,
    the trends and any warnings (models that do not beat a baseline)."""

    title: str
    axes: tuple[str, ...]
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    paper_table: str | None = None
    paper_columns: tuple[PaperColumn, ...] = ()
    paper_note: str = ""
    trends: tuple[Trend, ...] = ()
    warnings: tuple[str, ...] = ()
    note: str = ""


# -- elementary statistics --------------------------------------------------------------------
def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% confidence interval (Student t; None for one value)."""
    from scipy import stats

    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * _sd(values) / math.sqrt(n)


@dataclass(frozen=True)
class MedianInterval:
    """A distribution-free confidence interval of a median: between two order statistics of
    the values, which bracket the median with probability ``level`` whatever their
    distribution (the number of values below the median is Binomial(n, 1/2))."""

    low: float
    high: float
    level: float  # the exact coverage: at least the level asked, or the most n values give
    n: int


def median_interval(values: Sequence[float], level: float = 1 - ALPHA) -> MedianInterval | None:
    """The narrowest order-statistic interval ``[x_(k), x_(n+1-k)]`` of ``values`` whose coverage
    ``1 - 2 P(Binomial(n, 1/2) < k)`` is at least ``level``; with too few values for that (5 or
    fewer at 95%), the full range ``[min, max]`` and its lower coverage (93.75% for 5); None for
    fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    ordered = sorted(values)

    def coverage(k: int) -> float:  # of [x_(k), x_(n+1-k)], k counted from 1
        return 1 - 2 * math.fsum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return MedianInterval(ordered[k - 1], ordered[n - k], coverage(k), n)


def _sd(values: Sequence[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect of a paired t-test over ``n`` pairs whose differences have
    standard deviation ``sd``: ``(t_{1-alpha/2,n-1} + t_{power,n-1}) * sd / sqrt(n)``."""
    from scipy import stats

    if n < 2:
        raise ValueError(f"the MDE needs at least two pairs, got {n}")
    return float(stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)


def paired_p(first: Sequence[float], second: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``) that two sets of
    paired values share a mean. Differences without spread: 1 when all are zero, 0 otherwise
    (the t statistic is undefined, the difference certain)."""
    from scipy import stats

    differences = [a - b for a, b in zip(first, second, strict=True)]
    if len(set(differences)) == 1:
        return 1.0 if differences[0] == 0 else 0.0
    with warnings.catch_warnings():  # seeds that agree to many digits: precision-loss warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_rel(first, second).pvalue)


def verdict_text(verdict: str, seeds: int) -> str:
    if verdict != UNRESOLVED:
        return verdict
    return f"not resolvable with {seeds} seed{'s' if seeds != 1 else ''}"


# -- comparisons ------------------------------------------------------------------------------
def compare(best: Cell, other: Cell, better: Better, other_label: str,
            paper_best: float | None = None, paper_other: float | None = None) -> Pair | None:
    """The paper's best row (``best``) against ``other`` over the seeds both have (None when
    they share none); see the module docstring for the verdict."""
    mine, theirs = best.by_seed(), other.by_seed()
    seeds = tuple(s for s in best.seeds if s in theirs)
    if not seeds:
        return None
    sign = 1.0 if better == "lower" else -1.0
    advantages = [sign * (theirs[s] - mine[s]) for s in seeds]  # > 0: the best row is better
    scale = abs(math.fsum(mine[s] for s in seeds) / len(seeds)) or 1.0
    mean = math.fsum(advantages) / len(seeds) / scale
    paper_effect = None
    if paper_best is not None and paper_other is not None:
        paper_effect = sign * (paper_other - paper_best) / (abs(paper_best) or 1.0)
    if len(seeds) < 2:
        return Pair(other_label, seeds, mean, None, None, None, paper_effect, UNRESOLVED)
    sd = _sd(advantages) / scale
    half = mean_ci(advantages)[1] / scale
    p = paired_p([theirs[s] for s in seeds], [mine[s] for s in seeds])
    detectable = mde(sd, len(seeds))
    if p < ALPHA and mean != 0:
        verdict = HOLDS if mean > 0 else FAILS
    elif paper_effect is not None and 0 < paper_effect and detectable <= paper_effect:
        verdict = FAILS  # powered to see the paper's effect, and it did not show
    else:
        verdict = UNRESOLVED
    return Pair(other_label, seeds, mean, half, p, detectable, paper_effect, verdict)


def best_rows(rows: Sequence[Row], column: int, better: Better) -> tuple[str, ...]:
    """The trained rows whose mean is best in ``column`` (several when tied)."""
    measured = [(row.label, row.cells[column].mean) for row in rows
                if row.kind == "model" and row.cells[column].mean is not None]
    if not measured:
        return ()
    pick = min if better == "lower" else max
    best = pick(value for _, value in measured)
    return tuple(label for label, value in measured if math.isclose(value, best, rel_tol=1e-12, abs_tol=0.0))


def trend(table: Table, index: int, must_beat: Sequence[str] = ()) -> Trend:
    """The paper column ``index`` of ``table``: its best row in the paper against each other
    trained row here, and the column's verdict. A pair with a row that does not beat every
    baseline of ``must_beat`` in that column is not resolvable: a model no better than a
    structure-blind sampler orders nothing."""
    spec = table.paper_columns[index]
    label = spec.label
    if spec.column is None:
        return Trend(label, None, (), (), None, 0, f"{label}: not measured here")
    models = [row for row in table.rows if row.kind == "model"]
    in_paper = [row for row in models if row.paper[index] is not None and row.cells[spec.column].n]
    here = best_rows(table.rows, spec.column, spec.better)
    if not in_paper or len(models) < 2:
        return Trend(label, None, here, (), None, 0,
                     f"{label}: fewer than two rows measured with the paper's best among them")
    pick = min if spec.better == "lower" else max
    best = pick(in_paper, key=lambda row: row.paper[index])
    pairs = tuple(pair for row in models if row is not best and (pair := compare(
        best.cells[spec.column], row.cells[spec.column], spec.better, row.label,
        best.paper[index], row.paper[index])) is not None)
    if not pairs:
        return Trend(label, best.label, here, (), None, 0, f"{label}: no seed measured for two rows")
    blind = {row.label for row in models if beaten_by(table, spec.column, row, must_beat)}
    pairs = tuple(dataclasses.replace(pair, verdict=UNRESOLVED, blind=True)
                  if blind & {best.label, pair.other} else pair for pair in pairs)
    verdicts = {pair.verdict for pair in pairs}
    verdict = FAILS if FAILS in verdicts else HOLDS if verdicts == {HOLDS} else UNRESOLVED
    seeds = min(pair.n for pair in pairs)
    holding = sum(pair.verdict == HOLDS for pair in pairs)
    line = (f"{label}: {verdict_text(verdict, seeds)}. Best in the paper {best.label}, best here "
            f"{' = '.join(here)} (of {len(models)} rows); {holding}/{len(pairs)} pairs hold: "
            + "; ".join(pair.text() for pair in pairs))
    if blind:
        line += f" ({', '.join(sorted(blind))} do(es) not beat the structure-blind baselines here)"
    return Trend(label, best.label, here, pairs, verdict, seeds, line)


def baseline_warnings(table: Table, metric: str, must_beat: Sequence[str]) -> tuple[str, ...]:
    """A line per trained row that does not beat (strictly, by mean) every baseline of
    ``must_beat`` on ``metric`` at the same S_eval (and CFG scale)."""
    lines = []
    for j, column in enumerate(table.columns):
        if column.metric != metric or column.ar_steps is None:
            continue
        for row in table.rows:
            beaten = beaten_by(table, j, row, must_beat)
            if beaten:
                lines.append(f"{row.label} does not beat {' and '.join(beaten)} on {column.header} "
                             f"({_short(row.cells[j].mean)})")
    return tuple(lines)


def beaten_by(table: Table, column: int, row: Row, must_beat: Sequence[str]) -> list[str]:
    """The baselines of ``must_beat`` (with their values) that the trained ``row`` does not
    beat, strictly by mean, in ``column``; empty for a baseline row or a missing value."""
    mine, better = row.cells[column].mean, table.columns[column].better
    if row.kind != "model" or mine is None:
        return []
    sign = 1.0 if better == "lower" else -1.0
    return [f"{b.label} ({_short(b.cells[column].mean)})" for b in table.rows
            if b.kind == "baseline" and b.label in must_beat and b.cells[column].mean is not None
            and not sign * mine < sign * b.cells[column].mean]


def _short(value: float) -> str:
    return f"{value:.3g}"


# -- building tables from records -------------------------------------------------------------
def columns_of(records: Sequence[dict], better: Callable[[str], Better]) -> tuple[Column, ...]:
    """The columns ``(metric, name, ar_steps, cfg)`` of metric records, in first-seen order:
    a metric's named records, or its skipped setting when it has none; a record's own
    interval (``... ±95%``) and per-AR-step values are not columns."""
    keys: dict[tuple, None] = {}
    for r in records:
        name = r["name"]
        if name is not None and (name.endswith(INTERVAL_SUFFIX) or PER_AR_STEP.match(name)):
            continue
        keys.setdefault((r["metric"], name, r["ar_steps"], r["cfg"]), None)
    named = [k for k in keys if k[1] is not None]
    keys = named + [k for k in keys if k[1] is None and not any(n[0] == k[0] for n in named)]
    return tuple(Column(*key, better=better(key[0])) for key in keys)


def cell(records_by_seed: Mapping[int, Sequence[dict]], column: Column, any_cfg: bool = False) -> Cell:
    """The cell of ``column`` from each seed's records (``any_cfg``: a record of any CFG scale
    serves, as a baseline's have none)."""
    values, seeds, skipped, intervals = [], [], None, []
    for seed, records in records_by_seed.items():
        for r in records:
            if (r["metric"], r["ar_steps"]) != (column.metric, column.ar_steps):
                continue
            if not any_cfg and r["cfg"] != column.cfg:
                continue
            if r["value"] is None:  # a skipped setting has no value, so no value's name
                skipped = r.get("skipped")
            elif r["name"] == column.name:
                values.append(float(r["value"]))
                seeds.append(seed)
            elif column.name is not None and r["name"] == column.name + INTERVAL_SUFFIX:
                intervals.append(float(r["value"]))
    interval = intervals[0] if len(values) == 1 and len(intervals) == 1 else None
    return Cell(tuple(values), tuple(seeds), None if values else skipped, interval)


def paper_columns(columns: Sequence[Column], paper_columns_: Sequence[tuple[str, int | None]],
                  better: Callable[[str], Better], cfg: float | None) -> tuple[PaperColumn, ...]:
    """Each paper column ``(metric, S_eval)`` matched with the first measured column of that
    metric at that S_eval and at the CFG scale ``cfg`` (or without one)."""
    out = []
    for metric, s in paper_columns_:
        index = next((j for j, c in enumerate(columns) if c.metric == metric and c.name is not None
                      and c.ar_steps == s and c.cfg in (cfg, None)), None)
        out.append(PaperColumn(metric, s, better(metric), index))
    return tuple(out)


def make_table(title: str, axes: Sequence[str], columns: Sequence[Column], rows: Sequence[Row],
               paper_table: str | None = None, paper: Sequence[PaperColumn] = (), paper_note: str = "",
               note: str = "", warn_metric: str | None = None, must_beat: Sequence[str] = ()) -> Table:
    """The table with its trends (one per paper column) and the baseline warnings on
    ``warn_metric`` (default: the metric a plugin declares the headline, ``headline_metric``)."""
    if warn_metric is None:
        from cfkit.metrics import headline_metric  # not at import: the statistics need no torch

        warn_metric = headline_metric()
    table = Table(title, tuple(axes), tuple(columns), tuple(rows), paper_table, tuple(paper), paper_note,
                  note=note)
    trends = tuple(trend(table, j, must_beat) for j in range(len(table.paper_columns)))
    return Table(table.title, table.axes, table.columns, table.rows, paper_table, table.paper_columns,
                 paper_note, trends, baseline_warnings(table, warn_metric, must_beat), note)
