"""Comparative benchmarks: grids of training runs, each evaluated at several S_eval and CFG
scales, reported as the paper's tables.

A bench config (TOML) names a base experiment, overrides for every run, the seeds, the
evaluation and a list of grids. A grid is the product of its axes; an axis maps variant
names to ``--set`` overrides. A run is identified by the hash of its validated experiment,
so runs shared by several grids (the default setting of every ablation) train once, and
``cfkit bench`` run again skips finished runs and resumes unfinished ones."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BeforeValidator, Field

from cfkit import checkpoint, evaluate, paper, plugins
from cfkit import config as configs
from cfkit import train as training
from cfkit.generate import GenerationError, denoises_whole_image
from cfkit.pipeline import Pipeline, image_grid, save_png

FORMAT = "cfkit-bench/1"


def _variant(value):
    return {"set": value} if isinstance(value, list) else value


class Variant(configs.Strict):
    """One value of an axis: its overrides and the paper table row it reproduces (default:
    the variant's name)."""

    set: list[str] = []
    paper: str | None = None


class Grid(configs.Strict):
    """Runs over the product of ``axes`` (axis -> variant name -> variant); ``table`` the
    paper table they reproduce (``cfkit.paper.TABLES``; its rows need a single axis)."""

    title: str | None = None
    table: str | None = None
    axes: dict[str, dict[str, Annotated[Variant, BeforeValidator(_variant)]]] = Field(min_length=1)


class Evaluation(configs.Strict):
    """How every run is evaluated: ``metrics`` at each S_eval in ``ar_steps`` and each CFG
    scale in ``cfg`` (metrics of the model, e.g. the probe, once)."""

    metrics: list[str] = ["fid", "class-accuracy"]
    num: int = Field(500, ge=2)
    ar_steps: list[int] = Field([1], min_length=1)
    cfg: list[float] = Field([1.0], min_length=1)
    steps: int | str = 50
    order: str = "random"
    seed: int = 0
    features: str | None = None
    batch_size: int = Field(250, ge=1)
    grid_images: int = Field(20, ge=1)  # per sample grid PNG
    figure4_steps: int = Field(8, ge=1)  # S of the validation loss per AR step


class Bench(configs.Strict):
    name: str
    base: str  # the experiment TOML every run starts from, relative to the bench file
    set: list[str] = []
    seeds: list[int] = Field([0], min_length=1)
    evaluation: Evaluation = Evaluation()
    grids: list[Grid] = Field(min_length=1)


@dataclass(frozen=True)
class Run:
    """One training run of the bench: its variant on each axis, its seed and experiment."""

    variants: tuple[tuple[str, str], ...]  # (axis, variant name) of the grid that named it first
    seed: int
    experiment: configs.Experiment
    key: str  # hash of the experiment
    rows: list = field(default_factory=list)  # (grid index, variant names) of every grid row it is

    @property
    def label(self) -> str:
        return ", ".join(f"{axis}={name}" for axis, name in self.variants)

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.key


def load(path, overrides: list[str] = ()) -> tuple[Bench, list[Run]]:
    """The bench config at ``path`` (``overrides`` added to its ``set``) and its runs, every
    experiment validated: a bad variant fails here, naming the run and the field."""
    path = Path(path)
    if not path.exists():
        raise configs.ConfigError(f"bench config not found: {path}")
    import tomllib

    try:
        bench = configs.validate(tomllib.loads(path.read_text()), Bench)
    except tomllib.TOMLDecodeError as error:
        raise configs.ConfigError(f"{path}: not valid TOML: {error}") from None
    bench = bench.model_copy(update={"set": [*bench.set, *overrides]})
    base = (path.parent / bench.base).resolve()
    for grid in bench.grids:
        if grid.table is not None:
            if grid.table not in paper.TABLES:
                raise configs.ConfigError(f"grids.table: {grid.table!r} is not a paper table; "
                                          f"allowed: {', '.join(paper.TABLES)}")
            if len(grid.axes) != 1:
                raise configs.ConfigError(f"grids.table {grid.table!r}: a paper table's rows are one "
                                          f"axis, got axes {', '.join(grid.axes)}")
    runs: dict[str, Run] = {}
    for index, grid in enumerate(bench.grids):
        for variants, seed in itertools.product(_combinations(grid), bench.seeds):
            sets = [s for _, _, variant in variants for s in variant.set]
            try:
                experiment = configs.load(base, [*bench.set, *sets, f"seed={seed}"])
            except configs.ConfigError as error:
                names = ", ".join(f"{axis}={name}" for axis, name, _ in variants)
                raise configs.ConfigError(f"run {names} seed {seed}: {error}") from None
            key = experiment_key(experiment)
            run = runs.setdefault(key, Run(tuple((a, n) for a, n, _ in variants), seed, experiment, key))
            run.rows.append((index, tuple(name for _, name, _ in variants)))
    return bench, list(runs.values())


def _combinations(grid: Grid) -> list[tuple[tuple[str, str, Variant], ...]]:
    axes = [[(axis, name, v) for name, v in variants.items()] for axis, variants in grid.axes.items()]
    return list(itertools.product(*axes))


def experiment_key(experiment: configs.Experiment) -> str:
    text = json.dumps(experiment.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def grid_runs(index: int, grid: Grid, runs: list[Run]) -> list[tuple[tuple[str, ...], list[Run]]]:
    """Each row of the grid ``index`` (its variant names) with its runs over the seeds."""
    rows = []
    for variants in _combinations(grid):
        names = tuple(name for _, name, _ in variants)
        rows.append((names, [run for run in runs if (index, names) in run.rows]))
    return rows


# -- running ----------------------------------------------------------------------------------
def run_bench(path, out, overrides: list[str] = (), progress: bool = True,
              report_only: bool = False, shard: tuple[int, int] = (0, 1)) -> dict:
    """Train and evaluate every run of the bench at ``path`` into ``out`` (skipping what is
    done), then write the report; returns ``results.json``'s content. ``report_only``
    trains and evaluates nothing: the report of the runs finished so far (a long grid's
    progress). ``shard`` ``(i, n)`` trains and evaluates only runs ``i, i + n, ...`` (n
    independent processes or machines share a grid; the report has every finished run)."""
    part, parts = shard
    if not 0 <= part < parts:
        raise ValueError(f"shard {part}/{parts}: give I/N with 0 <= I < N, e.g. 0/2")
    started = time.perf_counter()
    bench, runs = load(path, overrides)
    out = Path(out)
    # Under torchrun every process trains each run (DDP or FSDP as configured); rank 0 alone
    # evaluates and reports while the others wait, for as long as evaluation takes.
    group = training.Distributed(timeout=datetime.timedelta(days=1))
    main = group.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    spec = bench.evaluation.model_dump(mode="json")
    eval_key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    try:
        for index, run in enumerate(runs, 1):
            folder = run.folder(out)
            if not report_only and (index - 1) % parts == part:
                if main:
                    say(f"[{index}/{len(runs)}] {run.label}, seed {run.seed} ({run.key})")
                train_run(run, folder, progress and main, main)
                if main:
                    evaluate_run(run, folder, bench.evaluation, eval_key, progress, str(group.device))
                    figure4_data(folder, bench.evaluation)
                training.barrier()
        if not main:
            return {}
        # Gathered after the loop: other shards finish runs while this one trains its own.
        results = [found for run in runs if (found := finished(run, run.folder(out), out, eval_key))]
        if report_only:
            say(f"{len(results)} of {len(runs)} runs trained and evaluated")
        report = {"format": FORMAT, "bench": bench.model_dump(mode="json"), "config": str(path),
                  "runs": results, "processes": group.world_size, "runs_planned": len(runs),
                  "eval_key": eval_key,
                  "tables": [table(i, bench, runs, results) for i in range(len(bench.grids))]}
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_report(report, out)
        return report
    finally:
        group.close()


def finished(run: Run, folder: Path, out: Path, eval_key: str) -> dict | None:
    """The results of ``run`` (from the files training and evaluation leave in ``folder``)
    when it is trained and evaluated, else None."""
    record, evaluated = folder / "bench-run.json", folder / "bench-eval" / eval_key / "records.json"
    if not (record.exists() and evaluated.exists()):
        return None
    figure4 = folder / "bench-figure4.json"  # null for a method without AR steps
    return {"key": run.key, "label": run.label, "variants": dict(run.variants), "seed": run.seed,
            "folder": str(folder.relative_to(out)),
            "train_seconds": json.loads(record.read_text()).get("train_seconds"),
            "records": json.loads(evaluated.read_text()),
            "figure4": json.loads(figure4.read_text()) if figure4.exists() else None}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train_run(run: Run, folder: Path, progress: bool, main: bool = True) -> None:
    """Train ``run`` into ``folder`` unless done; resume it when a checkpoint exists; record
    the training seconds (all attempts) in ``bench-run.json``. Every process of a torchrun
    calls it; ``main`` (rank 0) alone changes files outside the trainer."""
    record = folder / "bench-run.json"
    target = run.experiment.train.max_steps
    done = training.checkpoints(folder)
    if done and int(done[-1].name.split("-")[-1]) >= target and record.exists():
        if main:
            say("  trained already")
        return
    if main:
        if not done and folder.exists():
            shutil.rmtree(folder)  # an attempt that never reached a checkpoint holds nothing to keep
        shutil.rmtree(folder / "bench-eval", ignore_errors=True)  # of weights about to change
        (folder / "bench-figure4.json").unlink(missing_ok=True)
        say(f"  training {target} steps" + (f" from {done[-1].name}" if done else ""))
    training.barrier()
    tick = time.perf_counter()
    training.train(run.experiment, folder, resume=bool(done), progress=progress)
    seconds = round(time.perf_counter() - tick, 1)
    if main:
        if done and record.exists():
            seconds += json.loads(record.read_text()).get("train_seconds") or 0.0
        _write_json(record, {"key": run.key, "label": run.label, "seed": run.seed, "train_seconds": seconds})


def evaluate_run(run: Run, folder: Path, spec: Evaluation, eval_key: str, progress: bool,
                 device: str = "cpu") -> None:
    """Write the records ``{metric, name, value, ar_steps, cfg}`` of ``run`` to
    ``bench-eval/<hash of the evaluation spec>/records.json`` unless there. A setting the
    method cannot sample (DiT in several AR steps) gets a record with value None and the
    reason."""
    cache = folder / "bench-eval" / eval_key / "records.json"
    if cache.exists():
        say("  evaluated already")
        return
    built = evaluate.build_metrics(spec.metrics)
    on_samples = [name for name, metric in built.items() if metric.needs == "samples"]
    others = [name for name in built if name not in on_samples]
    records: list[dict] = []
    common = dict(num=spec.num, features=spec.features, batch_size=spec.batch_size, progress=progress,
                  device=device)
    for cfg, s in itertools.product(spec.cfg, spec.ar_steps):
        if not on_samples:
            break
        say(f"  evaluating S_eval={s}, cfg={cfg}")
        generation = dict(order=spec.order, steps=spec.steps, cfg=cfg, seed=spec.seed)
        try:
            found = evaluate.evaluate(folder, on_samples, ar_steps=[s], generation=generation,
                                      samples_out=cache.parent / f"cfg{cfg:g}", **common)
        except GenerationError as error:
            records += [{"metric": m, "name": None, "value": None, "ar_steps": s, "cfg": cfg,
                         "skipped": str(error)} for m in on_samples]
            continue
        records += [{**r, "cfg": cfg} for r in found["results"]]
    if others:
        say(f"  evaluating {', '.join(others)}")
        generation = dict(order=spec.order, steps=spec.steps, seed=spec.seed)
        found = evaluate.evaluate(folder, others, generation=generation, **common)
        records += [{**r, "cfg": None} for r in found["results"]]
        records += [{"metric": m, "name": None, "value": None, "ar_steps": None, "cfg": None,
                     "skipped": why} for m, why in found["skipped"].items()]
    _write_json(cache, records)


@torch.no_grad()
def figure4_data(folder: Path, spec: Evaluation) -> None:
    """Write the paper's figure 4 for one run to ``bench-figure4.json`` unless there: the
    distribution of AR step sizes |κ_s| its schedule draws, and its validation loss
    (unweighted ε-MSE, t uniform) per AR step when the held-out images are split into
    ``spec.figure4_steps`` equal steps in random order; null for a method without AR steps."""
    cache = folder / "bench-figure4.json"
    if cache.exists():
        return
    method = checkpoint.load(checkpoint.resolve(folder))
    model = method.model
    if not hasattr(method, "planner") or denoises_whole_image(model) or hasattr(model, "check_text"):
        _write_json(cache, None)
        return
    from cfkit.plan import Plan
    from cfkit.schedules import draw_steps, step_index

    config, steps = method.config, spec.figure4_steps
    generator = torch.Generator().manual_seed(spec.seed)
    drawn = draw_steps(method.planner.schedule, config.num_tokens, 2000, generator, True)
    sizes = torch.cat([torch.bincount(row) for row in drawn])  # |κ_s| of every drawn AR step
    counts = torch.bincount(sizes, minlength=config.num_tokens + 1)
    context = evaluate.EvalContext(method, show_progress=False)
    images, labels = context.dataset_images("val")
    images, labels = images[:500], labels[:500]
    tokenizer = method.experiment.data.tokenizer.build()
    latents = tokenizer.encode(images.float() / 127.5 - 1)
    n, length = len(latents), config.num_tokens
    order = plugins.build("orderings", "random")(n, config.grid, generator)
    split = plugins.build("schedules", "fixed", steps=steps)(length)
    step = step_index(split).expand(n, -1)
    t = torch.randint(0, method.diffusion.num_timesteps, (n, 1, 1), generator=generator)
    plan = Plan(order, step, t.expand(-1, -1, len(split)))
    noise = torch.randn(n, 1, length, config.token_dim, generator=generator)
    method.model.eval()
    per_token = method.plan_loss(latents, labels, plan, noise).per_token[:, 0]  # (N, L)
    per_step = [float(per_token[:, step[0] == s].mean()) for s in range(len(split))]
    _write_json(cache, {"step_size_counts": {str(k): int(c) for k, c in enumerate(counts.tolist()) if c},
                        "ar_steps": steps, "validation_loss": per_step, "num_images": n})


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=1) + "\n"
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# -- tables -----------------------------------------------------------------------------------
def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% confidence interval (Student t; None for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None
    from scipy import stats

    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * sem)


def column_keys(records_of_runs: list[list[dict]]) -> list[tuple]:
    """The table's columns ``(metric, name, ar_steps, cfg)`` in first-seen order."""
    keys: dict[tuple, None] = {}
    for records in records_of_runs:
        for r in records:
            keys.setdefault((r["metric"], r["name"], r["ar_steps"], r["cfg"]), None)
    named = [k for k in keys if k[1] is not None]
    return named + [k for k in keys if k[1] is None and not any(n[0] == k[0] for n in named)]


def table(index: int, bench: Bench, runs: list[Run], results: list[dict]) -> dict:
    """Grid ``index`` as a table: a row per variant combination, mean ± 95% CI over its seeds
    of every record, the paper's numbers and whether the paper's trend holds."""
    grid, by_key = bench.grids[index], {r["key"]: r for r in results}
    rows = []
    for names, members in grid_runs(index, grid, runs):
        members = [m for m in members if m.key in by_key]  # a partial report lacks some
        records = [by_key[m.key]["records"] for m in members]
        rows.append({"variants": list(names), "seeds": [m.seed for m in members], "records": records})
    columns = column_keys([rec for row in rows for rec in row["records"]])
    for row in rows:
        row["cells"] = [_cell(row["records"], column) for column in columns]
        del row["records"]
    out = {"title": grid.title or (paper.TABLES[grid.table].title if grid.table else " x ".join(grid.axes)),
           "axes": list(grid.axes), "table": grid.table,
           "columns": [dict(zip(("metric", "name", "ar_steps", "cfg"), c, strict=True)) for c in columns],
           "rows": rows}
    if grid.table is not None:
        out.update(_paper_comparison(grid, rows, columns, bench.evaluation.cfg[0]))
    return out


def _cell(records_of_runs: list[list[dict]], column: tuple) -> dict:
    values, skipped = [], None
    metric, name, ar_steps, cfg = column
    for records in records_of_runs:
        for r in records:
            if (r["metric"], r["ar_steps"], r["cfg"]) != (metric, ar_steps, cfg):
                continue
            if r["value"] is None:  # a skipped setting has no value, so no value's name
                skipped = r.get("skipped")
            elif r["name"] == name:
                values.append(float(r["value"]))
    if not values:
        return {"mean": None, "ci95": None, "n": 0, "skipped": skipped}
    mean, ci = mean_ci(values)
    return {"mean": mean, "ci95": ci, "n": len(values), "values": values}


def welch_p(first: list[float], second: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test that two sets of seeds share a mean; None with fewer
    than two values on a side or no spread at all."""
    if len(first) < 2 or len(second) < 2:
        return None
    from scipy import stats

    # From the summary statistics: ttest_ind on the raw values warns of precision loss when
    # seeds agree to many digits, as a probe's accuracies often do.
    (m1, s1), (m2, s2) = ((float(np.mean(v)), float(np.std(v, ddof=1))) for v in (first, second))
    if s1 == s2 == 0:
        return None
    return float(stats.ttest_ind_from_stats(m1, s1, len(first), m2, s2, len(second), equal_var=False).pvalue)


def _paper_comparison(grid: Grid, rows: list[dict], columns: list[tuple], cfg: float) -> dict:
    """The paper's value of each row and column, and a trend line per paper column: whether
    the variant best in the paper is best here (at the first CFG scale), how many pairs of
    variants are ordered as in the paper, and whether the best here leads the runner-up by
    more than seed noise (Welch's t-test over the seeds)."""
    reference = paper.TABLES[grid.table]
    (axis, variants), = grid.axes.items()
    keys = [variants[row["variants"][0]].paper or row["variants"][0] for row in rows]
    paper_rows = [list(reference.rows.get(k, [None] * len(reference.columns))) for k in keys]
    trends = []
    for j, (metric, s) in enumerate(reference.columns):
        index = next((i for i, c in enumerate(columns) if c[0] == metric and c[1] is not None
                      and c[2] == s and c[3] in (cfg, None)), None)
        pairs = [(keys[i], paper_rows[i][j], rows[i]["cells"][index]["mean"],
                  rows[i]["cells"][index]["values"])
                 for i in range(len(rows)) if index is not None and paper_rows[i][j] is not None
                 and rows[i]["cells"][index]["mean"] is not None]
        label = f"{metric}" + (f" S={s}" if s is not None else "")
        if len(pairs) < 2:
            trends.append({"column": label, "holds": None, "line": f"{label}: fewer than two "
                           "variants with both a paper and a measured value"})
            continue
        sign = 1 if metric in paper.LOWER_IS_BETTER else -1
        best_paper = min(pairs, key=lambda p: sign * p[1])[0]
        ranked = sorted(pairs, key=lambda p: sign * p[2])  # best here first
        best = [p[0] for p in ranked if p[2] == ranked[0][2]]
        best_here = " = ".join(best)
        both = list(itertools.combinations(pairs, 2))
        agree = sum((a[1] - b[1]) * (a[2] - b[2]) > 0 for a, b in both)
        holds = None if len(best) > 1 else best_paper == best_here  # a tie decides nothing
        verdict = {None: "is undecided (a tie)", True: "holds", False: "does not hold"}[holds]
        first, second = ranked[:2]
        p_value = None if holds is None else welch_p(first[3], second[3])
        lead = ("" if p_value is None else f" ({first[0]} ahead of {second[0]}: p = {p_value:.2g}, "
                f"Welch t over seeds, {'' if p_value < 0.05 else 'not '}significant at 5%)")
        trends.append({"column": label, "holds": holds, "best_paper": best_paper, "best_here": best_here,
                       "pairs_agreeing": agree, "pairs": len(both), "runner_up": second[0],
                       "p_best_vs_runner_up": p_value,
                       "line": f"{label}: best in the paper {best_paper}, here {best_here}; "
                               f"{agree}/{len(both)} pairs ordered as in the paper: the trend "
                               f"{verdict} here{lead}"})
    return {"paper": {"columns": [f"{m}" + (f" S={s}" if s else "") for m, s in reference.columns],
                      "rows": paper_rows, "note": reference.note}, "trends": trends}


# -- report -----------------------------------------------------------------------------------
def write_report(report: dict, out: Path) -> None:
    """``results.json``, the plots and ``report.md`` in ``out``."""
    _write_json(out / "results.json", report)
    figures = plots(report, out)
    text = markdown(report, figures)
    checkpoint.atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def _header(column: dict) -> str:
    text = column["name"] or column["metric"]
    if column["ar_steps"] is not None:
        text += f" S={column['ar_steps']}"
    if column["cfg"] is not None:
        text += f" cfg={column['cfg']:g}"
    return text


def markdown_table(entry: dict) -> str:
    headers = [" / ".join(entry["axes"]), "seeds"] + [_header(c) for c in entry["columns"]]
    if "paper" in entry:
        headers += [f"paper {c}" for c in entry["paper"]["columns"]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for i, row in enumerate(entry["rows"]):
        cells = [" / ".join(row["variants"]), str(len(row["seeds"]))]
        for cell in row["cells"]:
            text = _number(cell["mean"])
            if cell["ci95"] is not None:
                text += f" ± {_number(cell['ci95'])}"
            cells.append(text if cell["mean"] is not None else ("n/a" if cell.get("skipped") else "—"))
        if "paper" in entry:
            cells += [_number(v) for v in entry["paper"]["rows"][i]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict, figures: dict[str, list[str]]) -> str:
    bench, spec = report["bench"], report["bench"]["evaluation"]
    count, planned = len(report["runs"]), report.get("runs_planned", len(report["runs"]))
    done = f"{count} runs" + (f" of {planned} (a partial report)" if planned > count else "")
    lines = [f"# cfkit bench: {bench['name']}", "",
             f"`cfkit bench {report['config']}`: {done}, "
             f"{len(bench['seeds'])} seed(s), {report['seconds']:.0f} s in all on this call "
             f"({_machine()}). Cells are mean ± 95% CI over seeds (a single seed: its value); "
             f"n/a: the method cannot sample that setting. Evaluation: {spec['num']} samples per "
             f"setting, {spec['steps']} diffusion steps per AR step, {spec['order']} order, "
             f"S_eval {spec['ar_steps']}, CFG {spec['cfg']}; the paper's numbers are ImageNet 256 "
             "(its trends, not its values, are what a small run can reproduce).", ""]
    for k, entry in enumerate(report["tables"]):
        lines += [f"## {'Main table: ' if k == 0 else ''}{entry['title']}", "", markdown_table(entry), ""]
        if entry.get("paper", {}).get("note"):
            lines += [f"Paper note: {entry['paper']['note']}.", ""]
        lines += [f"- {t['line']}" for t in entry.get("trends", [])] + [""]
        for name in figures.get(f"table{k}", []):
            lines += [f"![{name}]({name})", ""]
    lines += ["## Runs", "", "| run | seed | folder | training s |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['seed']} | `{r['folder']}` | {_number(r['train_seconds'])} |"
              for r in report["runs"]]
    skipped = sorted({(r["metric"], r["skipped"]) for run in report["runs"] for r in run["records"]
                      if r.get("skipped")})
    if skipped:
        lines += ["", "Not measured:"] + [f"- {m}: {why}" for m, why in skipped]
    lines += [""]
    for name in figures.get("report", []):
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def plots(report: dict, out: Path) -> dict[str, list[str]]:
    """Write the PNGs; returns their names by where the report shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, list[str]] = {"report": []}

    def save(fig, name: str, where: str) -> None:
        fig.tight_layout()
        checkpoint.atomic_write(out / name, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        figures.setdefault(where, []).append(name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in report["runs"]:
        path = out / run["folder"] / "metrics.csv"
        if path.exists():
            rows = training.read_metrics(path)
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows],
                    label=f"{run['label']} s{run['seed']}")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="loss curves")
    ax.legend(fontsize=7)
    save(fig, "loss_curves.png", "report")

    with_fig4 = [r for r in report["runs"] if r["figure4"]]
    if with_fig4:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for run in with_fig4:
            data = run["figure4"]
            sizes = [int(k) for k in data["step_size_counts"]]
            counts = np.array(list(data["step_size_counts"].values()), dtype=float)
            left.step(sizes, counts / counts.sum(), where="mid", label=run["label"])
            right.plot(range(1, data["ar_steps"] + 1), data["validation_loss"], marker="o",
                       label=f"{run['label']} s{run['seed']}")
        left.set(xlabel="|κ_s| (tokens per AR step)", ylabel="share of AR steps", xscale="log",
                 title="AR step sizes the training schedule draws")
        right.set(xlabel="AR step s", ylabel="validation ε-MSE",
                  title=f"validation loss per AR step (S={with_fig4[0]['figure4']['ar_steps']})")
        right.legend(fontsize=7)
        save(fig, "figure4.png", "report")

    for k, entry in enumerate(report["tables"]):
        fid = [(i, c) for i, c in enumerate(entry["columns"]) if c["metric"] == "fid"
               and c["ar_steps"] is not None]
        scales = sorted({c["cfg"] for _, c in fid})
        if len({c["ar_steps"] for _, c in fid}) < 2:
            continue
        fig, axes = plt.subplots(1, len(scales), figsize=(5 * len(scales), 3.5), squeeze=False)
        for ax, cfg in zip(axes[0], scales, strict=True):
            for row in entry["rows"]:
                points = [(c["ar_steps"], row["cells"][i]["mean"]) for i, c in fid
                          if c["cfg"] == cfg and row["cells"][i]["mean"] is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=" / ".join(row["variants"]))
            ax.set(xlabel="S_eval", ylabel="FID", xscale="log", title=f"FID against S_eval, cfg {cfg:g}")
            ax.legend(fontsize=7)
        save(fig, f"fid_vs_s_eval-{k}.png", f"table{k}")

    figures["report"] += sample_grids(report, out)
    return figures


def _first_seed_runs(report: dict) -> list[dict]:
    seen, runs = set(), []
    for run in report["runs"]:
        if run["label"] not in seen:
            seen.add(run["label"])
            runs.append(run)
    return runs


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


def _enlarged(images: np.ndarray, side: int = 64) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` scaled up (nearest) to about ``side`` pixels, with a grey frame
    so that neighbours in a grid stay apart."""
    scale = max(1, side // images.shape[1])
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.pad(big, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=96)


def sample_grids(report: dict, out: Path) -> list[str]:
    """A grid PNG per method (first seed), S_eval and CFG scale, and the editing examples of
    the causal ones. Both come from the run's evaluation folder of the report's evaluation
    spec: the editing example is made once per trained run and copied after."""
    spec = report["bench"]["evaluation"]
    names = []
    for run in _first_seed_runs(report):
        folder = out / run["folder"]
        evaluated = folder / "bench-eval" / report["eval_key"]
        for path in sorted(evaluated.glob("cfg*/samples-S*.npz")):
            with np.load(path) as arrays:
                images = arrays["arr_0"][: spec["grid_images"]]
            name = f"samples-{_slug(run['label'])}-{path.stem.split('-')[-1]}-{path.parent.name}.png"
            save_png(out / name, image_grid(_enlarged(images)))
            names.append(name)
        made, cannot = evaluated / "editing.png", evaluated / "editing-none.txt"
        if not (made.exists() or cannot.exists()) and not editing_example(folder, made, spec):
            checkpoint.atomic_write(cannot, lambda tmp: Path(tmp).write_text("this model cannot edit\n"))
        if made.exists():
            name = f"editing-{_slug(run['label'])}.png"
            checkpoint.atomic_write(out / name, lambda tmp, made=made: shutil.copyfile(made, tmp))
            names.append(name)
    return names


def editing_example(folder: Path, path: Path, spec: dict) -> bool:
    """Held-out images, then each with its top half and its centre kept and the rest
    regenerated for the next class, one row each; False for a model that cannot edit."""
    method = checkpoint.load(checkpoint.resolve(folder))
    try:
        pipe = Pipeline(method)
    except GenerationError:
        return False
    if pipe.tokenizer is None or pipe.text_conditioned or denoises_whole_image(pipe.model):
        return False
    images, labels = evaluate.EvalContext(method, show_progress=False).dataset_images("val")
    images, labels = images[:8].float() / 127.5 - 1, labels[:8]
    new = (labels + 1) % pipe.model.config.num_classes
    rows = [images] + [pipe.edit(images, keep, new, steps=spec["steps"], order=spec["order"],
                                 cfg=max(spec["cfg"]), seed=spec["seed"]) for keep in ("top", "centre")]
    uint8 = [((r.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for r in rows]
    strips = [np.concatenate(list(_enlarged(u)), axis=1) for u in uint8]
    save_png(path, np.concatenate(strips, axis=0))
    return True
