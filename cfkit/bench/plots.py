"""The bench report's PNGs, drawn from what the runs left (the report's ``results`` and
typed tables): training loss curves, the paper's figure 4, the headline metric (the one a
plugin declares so, e.g. FID) against S_eval, sample grids labelled by class and editing
examples labelled by row. Fonts are 8 pt or larger."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from cfkit.bench import stats
from cfkit.bench.schema import EDIT_ROWS, Evaluation
from cfkit.bench.stats import ARROWS, Table
from cfkit.metrics import headline_metric
from cfkit.pipeline import compose

FONT = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
        "xtick.labelsize": 8, "ytick.labelsize": 8}
MAX_GRID_ROWS = 10  # classes shown per sample grid
BASELINE_STYLES = [dict(linestyle="--", color="dimgrey", marker="s"),
                   dict(linestyle=":", color="grey", marker="^"),
                   dict(linestyle="-.", color="darkgrey", marker="v")]


def plots(report: dict, tables: list[Table], spec: Evaluation, out: Path,
          folder: Path) -> dict[str, list[str]]:
    """Write the PNGs into ``folder``; returns their names by where the report shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, list[str]] = {"report": []}

    def save(fig, name: str, where: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, format="png", dpi=100)
        plt.close(fig)
        figures.setdefault(where, []).append(name)

    with plt.rc_context(FONT):
        loss_curves(plt, report, out, save)
        figure4(plt, report, spec, save)
        headline = headline_metric()
        for k, table in enumerate(tables):
            headline_against_s_eval(plt, table, k, save, headline)
        sample_grids(plt, report, spec, out, save)
    return figures


def _first_seed_runs(report: dict) -> list[dict]:
    seen, runs = set(), []
    for run in report["runs"]:
        if run["label"] not in seen:
            seen.add(run["label"])
            runs.append(run)
    return runs


def _colours(plt, labels: list[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def loss_curves(plt, report: dict, out: Path, save) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [run["label"] for run in _first_seed_runs(report)]
    colours, shown = _colours(plt, labels), set()
    for run in report["runs"]:
        path = out / run["folder"] / "metrics.csv"
        if not path.exists():
            continue
        with path.open(newline="") as handle:
            rows = [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]
        label = None if run["label"] in shown else run["label"]
        shown.add(run["label"])
        ax.plot(*zip(*rows, strict=True), color=colours[run["label"]], alpha=0.8, linewidth=1, label=label)
    ax.set(xlabel="training step", ylabel="training loss (weighted ε-MSE, log scale)", yscale="log",
           title="training loss, every run (one colour per setting)")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(loc="upper right", ncol=1 + len(shown) // 12)
    save(fig, "loss_curves.png", "report")


def figure4(plt, report: dict, spec: Evaluation, save) -> None:
    """The paper's figure 4: the AR step sizes each training schedule draws, and the held-out
    loss per AR step at S_eval ``spec.figure4_s`` (the heldout-loss records, mean over seeds)."""
    drawn = [run for run in _first_seed_runs(report) if run["figure4"]]
    s = spec.figure4_s
    per_step: dict[str, dict[int, list[float]]] = {}
    for run in report["runs"]:
        for r in run["records"]:
            match = r["name"] and stats.PER_AR_STEP.match(r["name"])
            if match and r["ar_steps"] == s and int(match["steps"]) == s and r["value"] is not None:
                by_step = per_step.setdefault(run["label"], {})
                by_step.setdefault(int(match["step"]), []).append(float(r["value"]))
    if not drawn and not per_step:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in drawn:
        counts = run["figure4"]["step_size_counts"]
        sizes = [int(k) for k in counts]
        shares = np.array(list(counts.values()), dtype=float)
        left.plot(sizes, shares / shares.sum(), marker="o", label=run["label"])
    left.set(xlabel="|κ_s|: tokens in an AR step (log scale)", ylabel="share of the drawn AR steps",
             xscale="log", title="AR step sizes each training schedule draws")
    left.grid(alpha=0.3)
    if drawn:
        left.legend()
    for label, steps in per_step.items():
        ks = sorted(steps)
        right.plot(ks, [sum(steps[k]) / len(steps[k]) for k in ks], marker="o", label=label)
        right.set_xticks(ks)
    right.set(xlabel=f"AR step s of {s}", ylabel="held-out ε-MSE (mean over seeds)",
              title=f"held-out loss per AR step, S_eval = {s}")
    right.grid(alpha=0.3)
    if per_step:
        right.legend()
    else:
        right.text(0.5, 0.5, "no held-out loss per AR step:\nadd heldout-loss to evaluation.metrics",
                   ha="center", va="center", transform=right.transAxes)
    save(fig, "figure4.png", "report")


def headline_against_s_eval(plt, table: Table, k: int, save, metric: str | None) -> None:
    """The headline ``metric`` of table ``k`` (e.g. FID) of each row against S_eval, a panel
    per CFG scale (± 95% CI); nothing when it is measured at fewer than two S_eval."""
    found = [(j, c) for j, c in enumerate(table.columns) if c.metric == metric and c.ar_steps is not None]
    if len({c.ar_steps for _, c in found}) < 2:
        return
    scales = sorted({c.cfg for _, c in found if c.cfg is not None})
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4), squeeze=False)
    for ax, cfg in zip(axes[0], scales, strict=True):
        baseline_styles = iter(BASELINE_STYLES * len(table.rows))
        for row in table.rows:
            points = [(c.ar_steps, row.cells[j].mean, row.cells[j].ci95 or 0.0) for j, c in found
                      if c.cfg == cfg and row.cells[j].mean is not None]
            if points:
                x, y, e = zip(*points, strict=True)
                style = next(baseline_styles) if row.kind == "baseline" else {}
                name = f"{row.label} (baseline)" if row.kind == "baseline" else row.label
                ax.errorbar(x, y, yerr=e, capsize=3, label=name, **({"marker": "o"} | style))
        ticks = sorted({c.ar_steps for _, c in found})
        ax.set(xlabel="S_eval: AR steps at sampling (log scale)", xscale="log",
               ylabel=f"{found[0][1].name} {ARROWS[found[0][1].better]} ({found[0][1].better} is better)",
               title=f"{metric.upper()} against S_eval, cfg {cfg:g} (± 95% CI)")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, f"{metric}_vs_s_eval-{k}.png", f"table{k}")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


def labelled_grid(plt, rows: list[list[np.ndarray]], row_labels: list[str], title: str,
                  column_labels: list[str] | None = None):
    """A figure of the image ``rows``, each labelled on the left."""
    grid = compose(rows)  # grey 1-pixel frames; imshow upscales
    h = rows[0][0].shape[0] + 2
    width = max(len(r) for r in rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 0.55 * width), 0.9 + 0.55 * len(rows)))
    image = grid[..., 0] if grid.shape[-1] == 1 else grid
    ax.imshow(image, cmap="gray" if grid.shape[-1] == 1 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([h * (i + 0.5) for i in range(len(rows))], row_labels)
    if column_labels:
        ax.set_xticks([h * (j + 0.5) for j in range(len(column_labels))], column_labels)
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    ax.set_title(title)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig


def class_rows(labels: np.ndarray, total: int) -> list[tuple[str, list[int]]]:
    """Sample indices by class, ``total`` images in all (at least one a class), at most
    ``MAX_GRID_ROWS`` classes; one unlabelled row when there are no classes."""
    classes = sorted({int(c) for c in labels if c >= 0})
    if not classes:
        return [("samples", list(range(min(total, len(labels)))))]
    per_class = max(1, math.ceil(total / len(classes)))
    return [(f"class {c}", [i for i in range(len(labels)) if labels[i] == c][:per_class])
            for c in classes[:MAX_GRID_ROWS]]


def sample_grids(plt, report: dict, spec: Evaluation, out: Path, save) -> None:
    """A grid per method (first seed), S_eval and CFG scale, a row per class; the editing
    example of the models that edit, a row each for the source, kept top, kept centre and
    regenerated images."""
    for run in _first_seed_runs(report):
        evaluated = out / run["eval_folder"]
        for path in sorted(evaluated.glob("cfg*/samples-S*.npz")):
            with np.load(path) as arrays:
                images, labels = arrays["arr_0"], arrays["labels"]
            chosen = class_rows(labels, spec.grid_images)
            s, cfg = path.stem.split("-")[-1], path.parent.name
            title = f"{run['label']}\n{s.replace('S', 'S_eval = ')}, {cfg.replace('cfg', 'cfg ')}"
            fig = labelled_grid(plt, [[images[i] for i in idx] for _, idx in chosen], [n for n, _ in chosen],
                                title)
            save(fig, f"samples-{_slug(run['label'])}-{s}-{cfg}.png", "report")
        editing = evaluated / "editing.npz"
        if editing.exists():
            with np.load(editing) as arrays:
                rows = [list(arrays[name]) for name in EDIT_ROWS]
                columns = [f"{a}→{b}" for a, b in zip(arrays["labels"], arrays["new_labels"], strict=True)]
            title = f"{run['label']}: editing\n(the rest regenerated for the next class)"
            fig = labelled_grid(plt, rows, list(EDIT_ROWS), title, columns)
            save(fig, f"editing-{_slug(run['label'])}.png", "report")
