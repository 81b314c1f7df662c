"""The bench config (pydantic, validated when read) and the runs it plans.

A bench config (TOML) names a base experiment, overrides for every run, the seeds, the
evaluation and a list of grids. A grid is the product of its axes; an axis maps variant
names to ``--set`` overrides. A run is identified by the hash of its validated experiment,
so runs shared by several grids (the default setting of every ablation) train once.

Seeds pair the runs: seed ``i`` of every variant starts from the same initial weights where
the shapes allow (``torch.manual_seed(seed)`` before the network is built), reads the data
in the same order and draws the same training randomness (both from ``(seed, step)``), and
every run is evaluated with the same sampling noise (``evaluation.seed``). So the
difference of two variants at seed ``i`` is a paired observation (``cfkit.bench.stats``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from cfkit import config as configs
from cfkit import paper
from cfkit.generate import SamplingOptions
from cfkit.precision import PRECISIONS

EVALUATION_PREFIX = "evaluation."
# The rows of an editing example (editing.npz), top to bottom.
EDIT_ROWS = ("source", "kept top", "kept centre", "regenerated")


def _variant(value):
    return {"set": value} if isinstance(value, list) else value


class Variant(configs.Strict):
    """One value of an axis: its overrides and the paper table row it reproduces (default:
    the variant's name)."""

    set: list[str] = []
    paper: str | None = None


class Grid(configs.Strict):
    """Runs over the product of ``axes`` (axis -> variant name -> variant); ``table`` the
    paper table they reproduce (a key of ``cfkit.paper.table_keys()``; its rows need a single axis).
    ``equal_compute``: every row but ``compute_reference`` (default: the axis's first
    variant) trains for the steps whose counted FLOPs (``cfkit.flops``) match the
    reference row's, instead of the same steps."""

    title: str | None = None
    table: str | None = None
    axes: dict[str, dict[str, Annotated[Variant, BeforeValidator(_variant)]]] = Field(min_length=1)
    equal_compute: bool = False
    compute_reference: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.table is not None:
            if self.table not in paper.table_keys():
                raise ValueError(f"table: {self.table!r} is not a paper table; allowed: "
                                 f"{', '.join(paper.table_keys())}")
            if len(self.axes) != 1:
                raise ValueError(f"table {self.table!r}: a paper table's rows are one axis, got "
                                 f"axes {', '.join(self.axes)}")
        if self.equal_compute or self.compute_reference is not None:
            if len(self.axes) != 1:
                raise ValueError(f"equal_compute: the rows are one axis, got axes {', '.join(self.axes)}")
            variants = list(next(iter(self.axes.values())))
            if self.compute_reference is not None and self.compute_reference not in variants:
                raise ValueError(f"compute_reference: {self.compute_reference!r} is not a variant; "
                                 f"allowed: {', '.join(variants)}")
        return self

    @property
    def reference_variant(self) -> str:
        return self.compute_reference or next(iter(next(iter(self.axes.values()))))


class Evaluation(configs.Strict):
    """How every run is evaluated: ``metrics`` at each S_eval in ``ar_steps`` and each CFG
    scale in ``cfg`` (metrics of the model, e.g. the probe, once, or once per S_eval where
    they take one, e.g. the held-out loss). ``reference_split``: the split FID and KID compare
    with. ``split_steps``: the ``steps`` are shared across the AR steps, so every S_eval
    makes the same number of network evaluations. ``baselines`` (``cfkit.baselines``) are
    scored with the same sample metrics at every S_eval and shown as rows of each image
    table. ``model_ar_steps``: the S_eval values of the model metrics that take one (the
    held-out loss; default ``ar_steps``): cheap, so they can cover more S_eval values than
    sampling. ``sampler``: a registered sampler with its options (e.g. ``{ name = "ddpm",
    variance = "fixed-small" }``). ``baseline_ar_steps``: the number of AR steps of the
    context-blind-ar baseline at every S_eval (at S_eval 1 it would copy one real image).
    ``figure4_steps``: the S_eval whose held-out loss per AR step figure 4 plots
    (default: the largest). ``metrics``, ``sampler`` and ``order`` default to those the plugins
    set (``evaluation.metrics``, ``sampling.sampler``, ``sampling.order``)."""

    metrics: list[str] = configs.plugin_default("evaluation.metrics")
    num: int = Field(500, ge=2)
    ar_steps: list[int] = Field([1], min_length=1)
    model_ar_steps: list[int] | None = Field(None, min_length=1)
    sampler: Annotated[configs.Component, configs._component("samplers")] = configs.component_default(
        "samplers", "sampling.sampler")
    baseline_ar_steps: int = Field(8, ge=1)
    cfg: list[float] = Field([1.0], min_length=1)
    steps: int | str = 50
    split_steps: bool = False
    order: str = configs.plugin_default("sampling.order")
    seed: int = 0
    features: str | None = None
    reference_split: Literal["train", "val"] = "val"
    baselines: list[str] = []
    batch_size: int = Field(250, ge=1)
    grid_images: int = Field(20, ge=1)  # per sample grid PNG
    figure4_steps: int | None = Field(None, ge=1)
    # fp32 unless set: "auto" would sample in bf16 on some machines only, and the figures of a
    # benchmark should compare across machines
    precision: Literal[PRECISIONS] = "fp32"

    def sampling_options(self, cfg: float = 1.0) -> SamplingOptions:
        """The ``SamplingOptions`` every run is sampled with at CFG scale ``cfg`` (the AR
        steps are set per S_eval)."""
        return SamplingOptions(order=self.order, steps=self.steps, split_steps=self.split_steps, cfg=cfg,
                               sampler=self.sampler.build(), batch_size=self.batch_size, seed=self.seed,
                               precision=self.precision)

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, names: list[str]) -> list[str]:
        if not names:
            return names
        try:
            from cfkit.baselines import BASELINES
        except ImportError:
            raise ValueError("baselines need cfkit.baselines, which this cfkit lacks") from None
        unknown = [n for n in names if n not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {', '.join(map(repr, unknown))}; allowed: "
                             f"{', '.join(BASELINES)}")
        return names

    @model_validator(mode="after")
    def _check_figure4(self):
        if self.figure4_steps is not None and self.figure4_steps not in self.model_s:
            raise ValueError(f"figure4_steps: {self.figure4_steps} is not an S_eval of the model "
                             f"metrics; allowed: {', '.join(map(str, self.model_s))}")
        return self

    @property
    def figure4_s(self) -> int:
        return self.figure4_steps or max(self.model_s)

    @property
    def model_s(self) -> list[int]:
        """The S_eval values of the model metrics that take one."""
        return self.model_ar_steps or self.ar_steps

    @property
    def key(self) -> str:
        """Hash of what the evaluation measures: a run's records are cached under it (how the
        report shows them, ``grid_images`` and ``figure4_steps``, is not part of it)."""
        return _digest(self.model_dump(mode="json", exclude={"grid_images", "figure4_steps"}))


class Bench(configs.Strict):
    name: str
    base: str  # the experiment TOML every run starts from, relative to the bench file
    set: list[str] = []
    seeds: list[int] = Field([0], min_length=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    grids: list[Grid] = Field(min_length=1)


@dataclass(frozen=True)
class Run:
    """One training run of the bench: its variant on each axis, its seed and experiment;
    ``note`` what sets it apart beyond its variants (the steps of an equal-compute row)."""

    variants: tuple[tuple[str, str], ...]  # (axis, variant name) of the grid that named it first
    seed: int
    experiment: configs.Experiment
    key: str  # hash of the experiment
    rows: list = field(default_factory=list)  # (grid index, variant names) of every grid row it is
    note: str = ""

    @property
    def label(self) -> str:
        text = ", ".join(f"{axis}={name}" for axis, name in self.variants)
        return f"{text} ({self.note})" if self.note else text

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.key


@dataclass(frozen=True)
class Overrides:
    """The ``--set`` overrides of one call, split by what they change."""

    experiment: tuple[str, ...] = ()
    evaluation: tuple[str, ...] = ()

    @classmethod
    def split(cls, texts) -> Overrides:
        """``evaluation.KEY=VALUE`` overrides the bench's ``[evaluation]``; any other the
        experiment of every run."""
        texts = list(texts)
        return cls(tuple(t for t in texts if not t.startswith(EVALUATION_PREFIX)),
                   tuple(t.removeprefix(EVALUATION_PREFIX) for t in texts if t.startswith(EVALUATION_PREFIX)))

    def given(self) -> list[str]:
        return [*self.experiment, *(EVALUATION_PREFIX + t for t in self.evaluation)]


def read(path, overrides: Overrides = Overrides()) -> Bench:
    """The bench config at ``path`` with ``overrides`` (experiment ones added to its ``set``)."""
    path = Path(path)
    if not path.exists():
        raise configs.ConfigError(f"bench config not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise configs.ConfigError(f"{path}: not valid TOML: {error}") from None
    if overrides.evaluation:
        evaluation = data.setdefault("evaluation", {})
        if not isinstance(evaluation, dict):
            raise configs.ConfigError("evaluation: must be a table")
        configs.apply_overrides(evaluation, list(overrides.evaluation))
    if overrides.experiment:
        data["set"] = [*data.get("set", []), *overrides.experiment]
    return configs.validate(data, Bench)


def load(path, overrides=()) -> tuple[Bench, list[Run]]:
    """The bench config at ``path`` (``overrides``: ``--set`` texts or an ``Overrides``) and its
    runs, every experiment validated: a bad variant fails here, naming the run and the field."""
    path = Path(path)
    if not isinstance(overrides, Overrides):
        overrides = Overrides.split(overrides)
    bench = read(path, overrides)
    base = (path.parent / bench.base).resolve()
    runs: dict[str, Run] = {}
    for index, grid in enumerate(bench.grids):
        steps = _equal_compute_steps(grid, bench, base) if grid.equal_compute else {}
        for variants, seed in itertools.product(combinations(grid), bench.seeds):
            names = tuple(name for _, name, _ in variants)
            sets = [s for _, _, variant in variants for s in variant.set]
            note = ""
            if names[0] in steps:
                sets.append(f"train.max_steps={steps[names[0]]}")
                note = f"equal compute: {steps[names[0]]} steps"
            experiment = _experiment(base, [*bench.set, *sets, f"seed={seed}"], variants, seed)
            key = experiment_key(experiment)
            run = runs.setdefault(key, Run(tuple((a, n) for a, n, _ in variants), seed, experiment, key,
                                           note=note))
            run.rows.append((index, names))
    return bench, list(runs.values())


def _experiment(base: Path, sets: list[str], variants, seed: int):
    try:
        return configs.load(base, sets)
    except configs.ConfigError as error:
        names = ", ".join(f"{axis}={name}" for axis, name, _ in variants)
        raise configs.ConfigError(f"run {names} seed {seed}: {error}") from None


def _equal_compute_steps(grid: Grid, bench: Bench, base: Path) -> dict[str, int]:
    """The training steps of every non-reference row of an equal-compute grid: those whose
    counted FLOPs (``cfkit.flops``) are nearest the reference row's."""
    from cfkit.flops import training_flops

    seed = bench.seeds[0]  # the count does not depend on the seed
    per_step = {}
    for variants in combinations(grid):
        (_, name, variant), = variants
        experiment = _experiment(base, [*bench.set, *variant.set, f"seed={seed}"], variants, seed)
        per_step[name] = (training_flops(experiment), experiment.train.max_steps)
    reference = grid.reference_variant
    flops, reference_steps = per_step[reference]
    budget = flops.per_step * reference_steps
    return {name: max(1, round(budget / counted.per_step))
            for name, (counted, _) in per_step.items() if name != reference}


def combinations(grid: Grid) -> list[tuple[tuple[str, str, Variant], ...]]:
    """Every row of ``grid``: ``(axis, variant name, variant)`` per axis."""
    axes = [[(axis, name, v) for name, v in variants.items()] for axis, variants in grid.axes.items()]
    return list(itertools.product(*axes))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def experiment_key(experiment) -> str:
    return _digest(experiment.model_dump(mode="json"))


def eval_folder(run_folder: Path, spec: Evaluation) -> Path:
    """Where a run's evaluation ``spec`` leaves its files."""
    return run_folder / "bench-eval" / spec.key


def baseline_key(experiment, spec: Evaluation) -> str:
    """Baselines are scored once per dataset (and image tokens) and evaluation."""
    return _digest({"data": experiment.data.model_dump(mode="json"), "evaluation": spec.key})


def baseline_folder(out: Path, name: str, experiment, spec: Evaluation) -> Path:
    return out / "baselines" / f"{name}-{baseline_key(experiment, spec)}"


def grid_runs(index: int, grid: Grid, runs: list[Run]) -> list[tuple[tuple[str, ...], list[Run]]]:
    """Each row of the grid ``index`` (its variant names) with its runs over the seeds."""
    rows = []
    for variants in combinations(grid):
        names = tuple(name for _, name, _ in variants)
        rows.append((names, [run for run in runs if (index, names) in run.rows]))
    return rows
