"""The bench report: reads the files the runs left (``cfkit.bench.runner``), builds the typed
tables (``cfkit.bench.stats``) and writes ``results.json``, ``report.md`` and the PNGs. It
trains, samples and evaluates nothing.

All report files of a bench are replaced together. They are written into a temporary folder
beside ``out`` (``.<out name>.report-<host>-<pid>-<hex>``); when every one is written, a
``COMPLETE`` marker listing them is added, then each is renamed into ``out`` (the PNGs first,
``report.md``, then ``results.json``), the PNGs of the previous report that the new one lacks
are removed and the folder is deleted. So a failure or a kill while writing leaves the
previous ``results.json`` and ``report.md`` as they were (the next call deletes the unmarked
folder). Only a kill between two renames, microseconds apart, can leave files of two reports
in ``out``; the marked folder then stays, and the next ``cfkit bench`` call on ``out``
finishes its renames before anything else (``recover``). Renames hold ``out/.report.lock``, so
shards finishing together never interleave theirs, and ``results.json`` and ``report.md``
carry the same ``report_id``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from cfkit import paper, plugins
from cfkit.bench import stats
from cfkit.bench.plots import plots
from cfkit.bench.schema import (
    Bench,
    Evaluation,
    Overrides,
    Run,
    baseline_folder,
    baseline_key,
    eval_folder,
    grid_runs,
)
from cfkit.bench.stats import Cell, Row, Table

FORMAT = "cfkit-bench/2"
# A trained model should beat the baselines that ignore the image's structure.
MUST_BEAT = ("independent-pixels", "context-blind-ar")
COMPLETE = "COMPLETE"
LOCK = ".report.lock"


def better(metric: str) -> stats.Better:
    """Which values of ``metric`` are better, as its plugin declares (``better``); higher for
    a metric that declares nothing or that no installed plugin registers."""
    try:
        factory = plugins.registry().component("metrics", metric).factory
    except plugins.UnknownComponentError:
        factory = None
    declared = getattr(factory, "better", None)
    return declared if declared in ("lower", "higher") else "higher"


# -- reading what the runs left -----------------------------------------------------------
def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def finished(run: Run, out: Path, spec: Evaluation) -> dict | None:
    """What ``run`` left in its folder when it is trained and evaluated, else None."""
    folder = run.folder(out)
    record, evaluated = _read(folder / "bench-run.json"), eval_folder(folder, spec)
    records = _read(evaluated / "records.json")
    if record is None or records is None:
        return None
    return {"key": run.key, "label": run.label, "variants": dict(run.variants), "seed": run.seed,
            "folder": str(folder.relative_to(out)), "eval_folder": str(evaluated.relative_to(out)),
            "max_steps": record.get("max_steps", run.experiment.train.max_steps),
            "train_seconds": record.get("train_seconds"), "train_flops": record.get("train_flops"),
            "attention_counted": record.get("attention_counted"), "machine": record.get("machine"),
            "records": records, "figure4": _read(evaluated / "figure4.json"),
            "feature_network": _read(evaluated / "feature-network.json")}


def baseline_records(spec: Evaluation, runs: list[Run], out: Path) -> dict[str, dict[str, list]]:
    """The scored baselines: ``{dataset key: {baseline name: records}}``."""
    found: dict[str, dict[str, list]] = {}
    for run in runs:
        key = baseline_key(run.experiment, spec)
        for name in spec.baselines:
            records = _read(baseline_folder(out, name, run.experiment, spec) / "records.json")
            if records is not None:
                found.setdefault(key, {})[name] = records
    return found


# -- tables -------------------------------------------------------------------------------
def grid_table(index: int, bench: Bench, runs: list[Run], results: dict[str, dict],
               baselines: dict[str, dict[str, list]]) -> Table:
    """Grid ``index`` as a table: a row per variant combination over the seeds finished so
    far, the baselines' rows when it has image metrics, the paper's values and trends."""
    grid, spec = bench.grids[index], bench.evaluation
    rows_runs = [(names, members, [results[m.key] for m in members if m.key in results])
                 for names, members in grid_runs(index, grid, runs)]
    columns = stats.columns_of([r for _, _, found in rows_runs for res in found for r in res["records"]],
                               better)
    reference = paper.table(grid.table) if grid.table else None
    variants = next(iter(grid.axes.values()))
    rows = []
    for names, members, found in rows_runs:
        by_seed = {res["seed"]: res["records"] for res in found}
        flops = [res["train_flops"] for res in found if res.get("train_flops") is not None]
        values = ()
        if reference is not None:
            key = variants[names[0]].paper or names[0]
            values = tuple(reference.rows.get(key, (None,) * len(reference.columns)))
        rows.append(Row(" / ".join(names), tuple(stats.cell(by_seed, c) for c in columns), values, "model",
                        tuple(by_seed), members[0].experiment.train.max_steps if members else None,
                        sum(flops) / len(flops) if flops else None))
    image_metrics = {c.metric for c in columns if c.ar_steps is not None}
    members = [m for _, group, _ in rows_runs for m in group]
    scored = baselines.get(baseline_key(members[0].experiment, spec), {}) if members else {}
    for name in spec.baselines:
        records = scored.get(name)
        if records is None or not image_metrics & {r["metric"] for r in records}:
            continue
        cells = tuple(stats.cell({spec.seed: records}, c, any_cfg=True) if c.ar_steps is not None else Cell()
                      for c in columns)
        rows.append(Row(name, cells, (None,) * len(reference.columns) if reference else (), "baseline"))
    title = grid.title or (reference.title if reference else " x ".join(grid.axes))
    note = ""
    if grid.equal_compute:
        title += ", at equal training compute"
        reference_row = next((r for r in rows if r.label == grid.reference_variant), None)
        steps = reference_row.steps if reference_row else None
        note = (f"At equal training compute: every row trains for the steps whose counted training "
                f"FLOPs (cfkit.flops) match those of {grid.reference_variant}'s {steps} steps; the "
                "steps and FLOPs columns give each row's.")
    paper_columns = ()
    if reference is not None:
        paper_columns = stats.paper_columns(columns, reference.columns, better, spec.cfg[0])
    return stats.make_table(title, tuple(grid.axes), columns, rows, grid.table, paper_columns,
                            reference.note if reference else "", note, must_beat=MUST_BEAT)


def table_json(table: Table) -> dict:
    """A table as results.json holds it, with each cell's mean and interval."""
    def cell_json(cell: Cell) -> dict:
        return {"mean": cell.mean, "ci95": cell.ci95, "n": cell.n, "values": list(cell.values),
                "seeds": list(cell.seeds), "skipped": cell.skipped}

    out = {"title": table.title, "axes": list(table.axes), "table": table.paper_table, "note": table.note,
           "columns": [{"metric": c.metric, "name": c.name, "ar_steps": c.ar_steps, "cfg": c.cfg,
                        "better": c.better, "header": c.header} for c in table.columns],
           "rows": [{"label": r.label, "variants": r.label.split(" / "), "kind": r.kind,
                     "seeds": list(r.seeds), "steps": r.steps, "train_flops": r.train_flops,
                     "cells": [cell_json(c) for c in r.cells], "paper": list(r.paper)} for r in table.rows],
           "trends": [{"column": t.column, "paper_best": t.paper_best, "best_here": list(t.best_here),
                       "verdict": t.verdict, "verdict_text": t.verdict_text, "seeds": t.seeds, "line": t.line,
                       "pairs": [{"other": p.other, "seeds": list(p.seeds), "mean": p.mean, "ci95": p.ci95,
                                  "p": p.p, "mde": p.mde, "paper_effect": p.paper_effect,
                                  "verdict": p.verdict} for p in t.pairs]} for t in table.trends],
           "warnings": list(table.warnings), "markdown": markdown_table(table)}
    if table.paper_columns:
        out["paper"] = {"columns": [c.label for c in table.paper_columns], "note": table.paper_note}
    return out


# -- writing ------------------------------------------------------------------------------
def write_report(config_path, bench: Bench, runs: list[Run], out, overrides: Overrides | None = None,
                 processes: int = 1, started: float | None = None) -> dict:
    """Read every finished run and baseline of the bench in ``out``, write ``results.json``,
    ``report.md`` and the PNGs there (all replaced together, see the module docstring) and
    return results.json's content."""
    out, overrides = Path(out), overrides or Overrides()
    spec = bench.evaluation
    found = [result for run in runs if (result := finished(run, out, spec))]
    by_key = {result["key"]: result for result in found}
    baselines = baseline_records(spec, runs, out)
    tables = [grid_table(i, bench, runs, by_key, baselines) for i in range(len(bench.grids))]
    report = {"format": FORMAT, "report_id": uuid.uuid4().hex[:12], "bench": bench.model_dump(mode="json"),
              "config": str(config_path), "overrides": overrides.given(), "runs": found,
              "baselines": baselines, "processes": processes, "runs_planned": len(runs),
              "eval_key": spec.key, "header": header(bench, runs, found, overrides),
              "tables": [table_json(t) for t in tables]}
    with staged(out) as folder:
        figures = plots(report, tables, spec, out, folder)
        report["files"] = [name for names in figures.values() for name in names]
        report["seconds"] = round(time.perf_counter() - started, 1) if started is not None else None
        text = markdown(report, tables, figures)
        (folder / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        (folder / "report.md").write_text(text)
    return report


@contextlib.contextmanager
def staged(out: Path):
    """A temporary folder beside ``out`` to write a report into; on success its files are
    renamed into ``out`` together, on failure it is deleted."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"{_prefix(out)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder = out.resolve().parent / name
    folder.mkdir()
    try:
        yield folder
        names = sorted(p.name for p in folder.iterdir())
        (folder / f".{COMPLETE}.tmp").write_text(json.dumps(names))
        os.replace(folder / f".{COMPLETE}.tmp", folder / COMPLETE)  # the set is complete
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    with _locked(out):
        _commit(folder, out)


def _prefix(out: Path) -> str:
    return f".{out.resolve().name}.report-"


@contextlib.contextmanager
def _locked(out: Path):
    import fcntl

    with open(out / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _commit(folder: Path, out: Path) -> None:
    """Rename a complete report folder's files into ``out`` (results.json last), drop the PNGs
    of the previous report the new one lacks, delete the folder."""
    names = json.loads((folder / COMPLETE).read_text())
    previous = []
    if (folder / "results.json").exists():  # else results.json is already the new one
        previous = (_read(out / "results.json") or {}).get("files", [])
    for name in sorted(names, key=lambda n: (n == "results.json", n == "report.md", n)):
        if (folder / name).exists():
            os.replace(folder / name, out / name)
    for name in set(previous) - set(names):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def recover(out) -> None:
    """Finish or discard the report folders beside ``out`` that a killed process left: a
    complete one (marked) is renamed into place, an incomplete one deleted. Folders of a
    process still running here, or written in the last hour on another host, are left."""
    out = Path(out)
    if not out.resolve().parent.exists():
        return
    for folder in sorted(out.resolve().parent.glob(f"{_prefix(out)}*")):
        host, _, rest = folder.name.removeprefix(_prefix(out)).rpartition("-")[0].rpartition("-")
        if _alive(host, rest, folder):
            continue
        if (folder / COMPLETE).exists():
            with _locked(out):
                _commit(folder, out)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _alive(host: str, pid: str, folder: Path) -> bool:
    if host != socket.gethostname():
        return time.time() - folder.stat().st_mtime < 3600
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- report.md ----------------------------------------------------------------------------
def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def _interval(value: float) -> str:
    """A ± half-width: two significant digits when small, so that it never reads 0.000."""
    return f"{value:.2g}" if 0 < abs(value) < 0.01 else _number(value)


def _flops(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _component(spec: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return spec["name"] + (f" ({options})" if options else "")


def header(bench: Bench, runs: list[Run], found: list[dict], overrides: Overrides) -> dict:
    """The settings report.md's header states: dataset, training, overrides, evaluation,
    feature network, baselines, machine."""
    spec = bench.evaluation
    datasets = {_component(run.experiment.data.dataset.model_dump(exclude={"kind"}))
                for run in runs if run.experiment.data.dataset is not None}
    steps = sorted({run.experiment.train.max_steps for run in runs})
    batches = sorted({run.experiment.train.batch_size for run in runs})
    equal = any(grid.equal_compute for grid in bench.grids)
    networks = {}
    for result in found:
        identity = result.get("feature_network")
        if identity:
            accuracy = identity.get("held_out_accuracy")
            networks[identity["name"]] = identity["name"] + (
                "" if accuracy is None else f", held-out accuracy {accuracy:.1%}")
    machines = set()
    for result in found:
        m = result.get("machine")
        if m:
            device = m["device"] if m["device"] != "cpu" else f"CPU ({m.get('cpu_capability')})"
            threads = m.get("threads")
            machines.add(f"{device}, {threads} torch thread{'' if threads == 1 else 's'}")
    steps_text = ", ".join(map(str, steps)) + " training steps"
    if equal:
        steps_text += " (equal-compute rows train their own steps: see their tables)"
    sampler = ", ".join([spec.sampler.name, *(f"{k}={v}" for k, v in spec.sampler.options.items())])
    generation = (f"{spec.num} samples per setting, sampler {sampler}, {spec.steps} diffusion steps "
                  + ("shared across the AR steps (equal network evaluations at every S_eval)"
                     if spec.split_steps else "per AR step")
                  + f", {spec.order} order, S_eval {spec.ar_steps}, CFG {spec.cfg}, seed {spec.seed} for "
                  f"every run; FID/KID against the {spec.reference_split} split; model metrics at S_eval "
                  f"{spec.model_s}")
    return {"dataset": ", ".join(sorted(datasets)) or "shards (no dataset)",
            "training": f"{steps_text}, batch {', '.join(map(str, batches))}",
            "overrides": overrides.given(),
            "bench set": list(bench.set[:len(bench.set) - len(overrides.experiment)]),
            "evaluation": generation, "metrics": list(spec.metrics),
            "feature network": "; ".join(networks.values()) or "— (no sample metric evaluated yet)",
            "baselines": [f"{b} ({spec.baseline_ar_steps} AR steps)" if b == "context-blind-ar" else b
                          for b in spec.baselines], "machine": "; ".join(sorted(machines)) or "—"}


def markdown_table(table: Table) -> str:
    """The table in markdown: a row per variant (baselines marked), mean ± 95% CI per column
    (bold: the best trained row), then the paper's columns as a separate group."""
    headers = [" / ".join(table.axes), "seeds", "steps", "train FLOPs"] + [c.header for c in table.columns]
    if table.paper_columns:
        headers += ["paper (ImageNet 256):"] + [c.label for c in table.paper_columns]
    best = [set() if c.spread else set(stats.best_rows(table.rows, j, c.better))
            for j, c in enumerate(table.columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table.rows:
        baseline = row.kind == "baseline"
        cells = [f"*baseline:* {row.label}" if baseline else row.label,
                 "—" if baseline else str(len(row.seeds)), str(row.steps) if row.steps else "—",
                 _flops(row.train_flops)]
        for j, cell in enumerate(row.cells):
            if cell.mean is None:
                cells.append("n/a" if cell.skipped else "—")
                continue
            text = _number(cell.mean) + ("" if cell.ci95 is None else f" ± {_interval(cell.ci95)}")
            cells.append(f"**{text}**" if row.label in best[j] and not baseline else text)
        if table.paper_columns:
            cells += [""] + [_number(v) for v in row.paper]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


VERDICTS = ("Trend lines: for each paper column, the paper's best row against every other trained row, "
            "paired by seed: the best row's relative advantage here (mean ± 95% CI), the paired t-test "
            "p-value and the minimum detectable effect (80% power, 5% two-sided), beside the paper's "
            "relative difference. A pair *holds* when significant (p < 0.05) in the paper's direction, "
            "*fails* when significant against it, or when not significant although the seeds' spread "
            "could have shown an effect of the paper's size (MDE <= the paper's effect); otherwise it is "
            "*not resolvable with N seeds* (more seeds needed); a pair with a row that does not beat the "
            "structure-blind baselines is not resolvable. A column fails when a pair fails, holds "
            "when every pair holds.")


def markdown(report: dict, tables: list[Table], figures: dict[str, list[str]]) -> str:
    bench, head = report["bench"], report["header"]
    count, planned = len(report["runs"]), report["runs_planned"]
    done = f"{count} runs" + (f" of {planned} (a partial report)" if planned > count else "")
    command = " ".join([f"cfkit bench {report['config']}"] + [f"--set {o}" for o in report["overrides"]])
    seconds = "" if report["seconds"] is None else f", {report['seconds']:.0f} s in all on this call"
    lines = [f"# cfkit bench: {bench['name']}", "",
             f"`{command}`: {done}, {len(bench['seeds'])} seed(s){seconds}.",
             "", "| setting | value |", "|---|---|",
             f"| dataset | {head['dataset']} |", f"| training | {head['training']} |",
             f"| overrides for every run | {', '.join(f'`{s}`' for s in head['bench set']) or 'none'} |",
             f"| command-line overrides | {', '.join(f'`{s}`' for s in head['overrides']) or 'none'} |",
             f"| evaluation | {head['evaluation']} |", f"| metrics | {', '.join(head['metrics'])} |",
             f"| feature network | {head['feature network']} |",
             f"| baselines | {', '.join(head['baselines']) or 'none'} |",
             f"| machine | {head['machine']} |", "",
             "Cells are mean ± 95% CI over seeds (Student t; one seed: the value, ± the record's own "
             "interval where it has one, e.g. the held-out loss over its images); ↓: lower is better, "
             "↑: higher is better; bold: the best trained row; n/a: the method cannot sample that "
             "setting. The columns after \"paper (ImageNet 256):\" are the paper's numbers: its trends, "
             "not its values, are what a small run can reproduce.", "", VERDICTS, ""]
    for k, table in enumerate(tables):
        lines += [f"## {'Main table: ' if k == 0 else ''}{table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines += [markdown_table(table), ""]
        if table.paper_note:
            lines += [f"Paper note: {table.paper_note}.", ""]
        lines += [f"- {t.line}" for t in table.trends]
        lines += [f"- ⚠ {w}" for w in table.warnings] + [""]
        for name in figures.get(f"table{k}", []):
            lines += [f"![{name}]({name})", ""]
    lines += ["## Runs", "", "| run | seed | steps | training s | training FLOPs | folder |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['seed']} | {r['max_steps']} | {_number(r['train_seconds'])} | "
              f"{_flops(r['train_flops'])} | `{r['folder']}` |" for r in report["runs"]]
    skipped = sorted({(r["metric"], r["skipped"]) for run in report["runs"] for r in run["records"]
                      if r.get("skipped")})
    if skipped:
        lines += ["", "Not measured:"] + [f"- {m}: {why}" for m, why in skipped]
    lines += [""]
    for name in figures.get("report", []):
        lines += [f"![{name}]({name})", ""]
    lines += [f"<!-- report_id: {report['report_id']} -->", ""]
    return "\n".join(lines)
