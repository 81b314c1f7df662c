"""The evaluation harness behind ``cfkit eval`` and ``cfkit fid``.

``evaluate`` loads a run or checkpoint, samples ``num`` class-balanced images (a text-to-image
checkpoint: one image per held-out caption, the first caption of each validation image) for
each number of AR steps in ``ar_steps`` (the generation options of ``cfkit sample``), runs the
requested metric plugins on them (metrics on the model, e.g. the linear probe, run once, or
once per S_eval when they declare ``per_ar_steps``, e.g. the held-out loss; caption metrics,
e.g. CIDEr, on greedy captions of ``num`` validation images) and returns an ``EvalReport`` of
``Record`` s, which ``write_report`` saves as ``eval.json`` (``EvalReport.as_dict``) and
``eval.md``. Under torchrun (a ``cfkit.distributed.Distributed`` group) the processes share
the sampling and rank 0 alone scores and reports: the samples are those of one process.
``score_samples`` scores images from elsewhere (``cfkit.baselines``) the same way, with a
context that has no model. Sample and reference features are extracted once and shared by the
metrics; the reference is a dataset split (features cached per dataset, split and feature
network) or a reference statistics file (``cfkit.reference_sets``). The feature network
defaults to the dataset's own classifier when a plugin declares one (built with the dataset's
options), else to the one declared the default (``cfkit.metrics.default_feature_network``).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from cfkit import checkpoint, data, plugins
from cfkit.generate import SamplingOptions, network_precision
from cfkit.methods import CAPTIONING, can
from cfkit.metrics import (
    BETTER,
    NEEDS,
    Extracted,
    MetricError,
    MetricSkipped,
    Statistics,
    dataset_images,
    default_feature_network,
    extract,
    frechet_distance,
    is_statistics_file,
    own_classifier,
    read_images,
)
from cfkit.progress import counter, say
from cfkit.reference_sets import FileReference, SplitReference, load_statistics
from cfkit.tokenizers import from_uint8

FORMAT = "cfkit-eval/1"


@dataclass(frozen=True)
class Record:
    """One value a metric measured: ``name`` (e.g. "FID-1000 (digits-cnn)") and ``value`` (a
    float, or a string such as "inf" for a non-finite one) at ``ar_steps`` (None: not per
    S_eval). A metric that did not apply there has name and value None and the reason in
    ``skipped``."""

    metric: str
    name: str | None
    value: float | str | None
    ar_steps: int | None
    skipped: str | None = None

    def as_dict(self) -> dict:
        """The record as ``eval.json`` and the bench's ``records.json`` store it (``skipped``
        only when set)."""
        record = {"metric": self.metric, "name": self.name, "value": self.value, "ar_steps": self.ar_steps}
        return record if self.skipped is None else {**record, "skipped": self.skipped}


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """What ``evaluate`` measured: the ``results`` (``Record`` s), the metrics ``skipped``
    altogether ``{metric: reason}``, and the settings (each None when no metric needed it):
    the ``dataset`` spec, the ``feature_network``'s identity, the ``reference`` (split or file)
    and size,
    the ``generation`` options, the ``seconds`` per stage and the ``captioning`` decoding."""

    format: str = FORMAT
    checkpoint: str
    method: str
    dataset: dict | None = None
    feature_network: dict | None = None
    reference: dict | None = None
    generation: dict | None = None
    results: list[Record] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    captioning: dict | None = None

    def as_dict(self) -> dict:
        """The report as ``eval.json`` stores it: the fields in this order, ``results`` as
        dicts, ``captioning`` only when captions were scored."""
        report = {f.name: getattr(self, f.name) for f in fields(self)}
        report["results"] = [record.as_dict() for record in self.results]
        if self.captioning is None:
            del report["captioning"]
        return report


@dataclass(eq=False)
class SampleSet:
    """uint8 ``images`` ``(N, C, H, W)`` generated for ``labels`` ``(N,)`` in ``ar_steps``
    (None: not generated in AR steps, e.g. real images)."""

    images: torch.Tensor
    labels: torch.Tensor
    ar_steps: int | None
    extracted: Extracted | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)


class EvalContext:
    """What metrics read: the method, its dataset and the feature network, the ``reference``
    set (the ``reference_split`` of the dataset, or the ``reference_stats`` file) and the
    sample features (each extracted once). ``for_experiment`` builds one without a method."""

    def __init__(self, method, features: str | None = None, feature_options: dict | None = None,
                 reference_split: str = "train", batch_size: int = 250, device: str = "cpu",
                 show_progress: bool = True, *, experiment=None, reference_stats=None):
        self._method = method
        self.experiment = method.experiment if method is not None else experiment
        self.feature_name, self.feature_options = features, dict(feature_options or {})
        self.reference_split, self.batch_size, self.device = reference_split, batch_size, device
        self.reference_stats, self.show_progress = reference_stats, show_progress
        self._images: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_experiment(cls, experiment, **options) -> EvalContext:
        """A context with no model, for sample metrics on images from elsewhere (e.g.
        ``cfkit.baselines``) against the reference of ``experiment``'s dataset; ``options``
        as the constructor's. Metrics that need the model raise ``MetricError`` on it."""
        return cls(None, experiment=experiment, **options)

    @property
    def method(self):
        if self._method is None:
            raise MetricError("this evaluation has no model (EvalContext.for_experiment): only "
                              "metrics on samples apply")
        return self._method

    @functools.cached_property
    def dataset_spec(self):
        spec = self.experiment.data.dataset
        if spec is None:
            raise MetricError("this run trains on shards without a dataset (data.dataset); the "
                              "reference images and the probe's labelled splits come from a dataset "
                              "(sample metrics: give --reference-stats FILE)")
        return spec

    @property
    def dataset_name(self) -> str:
        return self.dataset_spec.name

    @functools.cached_property
    def dataset(self):
        return self.dataset_spec.build()

    def held_out_captions(self, num: int) -> tuple[list[list[str]], torch.Tensor]:
        """The captions ``[[caption, ...], ...]`` and labels ``(num,)`` of the first ``num``
        validation images (cycled when there are fewer)."""
        found = [(s.captions, -1 if s.label is None else s.label)
                 for s in data.dataset_samples(self.dataset, "val")]
        if not found or any(not captions for captions, _ in found):
            raise MetricError(f"dataset {self.dataset_name} has no captions for every validation image")
        chosen = [found[i % len(found)] for i in range(num)]
        return [c for c, _ in chosen], torch.tensor([label for _, label in chosen])

    def dataset_images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``(N, C, H, W)`` and labels ``(N,)`` of a dataset split (read once)."""
        if split not in self._images:
            self._images[split] = dataset_images(self.dataset, split)
        return self._images[split]

    @property
    def has_dataset(self) -> bool:
        """Whether the run names a dataset (a run on shards alone does not)."""
        return self.experiment is not None and self.experiment.data.dataset is not None

    @functools.cached_property
    def network(self):
        """The feature network (default: the one declared for the dataset); the dataset's own
        classifier is built with the dataset's options."""
        dataset = self.dataset_name if self.has_dataset else None
        name = self.feature_name
        if name is None:
            name = default_feature_network(dataset)
        options = dict(self.feature_options)
        if dataset is not None and own_classifier(name) == dataset:
            options = {**self.dataset_spec.options, **options}
        return plugins.build("feature_networks", name, **options).to(self.device)

    @functools.cached_property
    def reference(self):
        """The reference set (``cfkit.reference_sets``): the reference statistics file when
        given, else the dataset's reference split."""
        if self.reference_stats is not None:
            return FileReference(self.reference_stats, self.network, self.batch_size, self.progress)
        return SplitReference(self, self.reference_split)

    def features(self, samples: SampleSet) -> Extracted:
        if samples.extracted is None:
            bar = self.progress(len(samples), f"features S={samples.ar_steps}")
            samples.extracted = extract(self.network, samples.images, self.batch_size, bar)
        return samples.extracted

    def progress(self, total: int, desc: str):
        return progress_bar(total, desc, self.show_progress)


def progress_bar(total: int, desc: str, show: bool = True):
    """``update(n)`` over ``total`` images: a bar on a terminal when ``show``, else lines
    (``cfkit.progress``)."""
    return counter(desc, "images", total, bar=show)


def build_metrics(names, options: dict[str, dict] | None = None) -> dict:
    """The metric plugins ``names`` built with their ``options`` (``{name: {key: value}}``)."""
    options = dict(options or {})
    unused = sorted(set(options) - set(names))
    if unused:
        raise MetricError(f"options given for metric(s) {unused} that are not evaluated; "
                          f"evaluated: {', '.join(names)}")
    if not names:
        raise MetricError(f"no metrics given; known: {', '.join(plugins.registry().names('metrics'))}")
    metrics = {}
    for name in names:
        try:
            metric = plugins.build("metrics", name, **options.get(name, {}))
        except TypeError as error:
            raise MetricError(f"metric {name!r} with options {options.get(name, {})}: {error}") from None
        if getattr(metric, "needs", None) not in NEEDS:
            raise MetricError(f"metric {name!r} needs {getattr(metric, 'needs', None)!r}; "
                              f"allowed: {', '.join(NEEDS)}")
        if getattr(metric, "better", None) not in BETTER:
            raise MetricError(f"metric {name!r} declares better={getattr(metric, 'better', None)!r}; "
                              f"allowed: {', '.join(BETTER)}")
        metrics[name] = metric
    return metrics


def evaluate(checkpoint_dir, metrics, *, num: int = 1000, ar_steps=(1,),
             generation: SamplingOptions | dict | None = None,
             metric_options: dict[str, dict] | None = None, features: str | None = None,
             feature_options: dict | None = None, reference_split: str = "train",
             reference_stats=None, batch_size: int = 250, device: str = "cpu",
             progress: bool = True, samples_out=None, group=None) -> EvalReport | None:
    """Evaluate a run or checkpoint: the report (see ``write_report``). ``generation``: the
    ``SamplingOptions`` (or a dict of its fields) but the AR steps, which ``ar_steps`` lists;
    ``batch_size`` images at a time, image i of a sample set drawn from (seed, i). The
    reference is the dataset's ``reference_split``, or the ``reference_stats`` file
    (``cfkit.reference_sets.FileReference``). With ``samples_out``, each sample set is saved as
    ``samples-S{S}.npz`` there (readable by ``cfkit fid``). Under a process ``group`` (a
    ``cfkit.distributed.Distributed`` of torchrun's processes) every process calls it: they
    share the sampling, and rank 0 alone scores and returns the report (the others None)."""
    started = time.perf_counter()
    directory = checkpoint.resolve(checkpoint_dir)
    built = build_metrics(list(metrics), metric_options)
    method = checkpoint.load(directory, device=device)
    main = group is None or group.is_main
    context = EvalContext(method, features, feature_options, reference_split, batch_size, device,
                          progress and main, reference_stats=reference_stats)
    if not isinstance(generation, SamplingOptions):
        generation = SamplingOptions.of(**dict(generation or {}))
    generation = SamplingOptions.of(generation, batch_size=batch_size)
    ar_steps = sorted(set(int(s) for s in ar_steps))
    if not main:  # another torchrun process: it samples its share when rank 0 samples
        if group.from_main(False):
            _sample_share(context, num, ar_steps, generation, group)
        return None
    skipped = {name: _skip_reason(metric, context) for name, metric in built.items()}
    skipped = {name: reason for name, reason in skipped.items() if reason is not None}
    active = {name: metric for name, metric in built.items() if name not in skipped}
    on_samples = {name: m for name, m in active.items() if m.needs == "samples"}
    on_model = {name: m for name, m in active.items() if m.needs == "model"}
    on_captions = {name: m for name, m in active.items() if m.needs == "captions"}
    for name, reason in skipped.items():
        say(f"skipped {name}: {reason}")
    # The EvalReport's fields, filled in stage by stage.
    parts = {"checkpoint": str(directory), "method": method.experiment.method.name, "results": [],
             "skipped": skipped, "seconds": {}}
    if (on_samples or on_model or on_captions) and context.has_dataset:
        parts["dataset"] = context.dataset_spec.model_dump()
    if group is not None:
        group.from_main(bool(on_samples))
    if on_samples:
        _evaluate_samples(parts, context, on_samples, num=num, ar_steps=ar_steps, generation=generation,
                          samples_out=samples_out, group=group)
    _evaluate_model(parts, context, on_model, ar_steps)
    if on_captions:
        _evaluate_captions(parts, context, on_captions, num=num, batch_size=batch_size, seed=generation.seed)
    parts["seconds"]["total"] = round(time.perf_counter() - started, 2)
    return EvalReport(**parts)


def _evaluate_samples(parts: dict, context: EvalContext, metrics: dict, *, num: int, ar_steps,
                      generation: SamplingOptions, samples_out, group=None) -> None:
    """Sample ``num`` images at each S_eval of ``ar_steps`` (the processes of ``group``
    sharing the batches) and add the sample metrics' records (and the reference, feature
    network and generation settings) to the report's ``parts``."""
    pipe = _pipeline(context.method)
    parts["reference"] = context.reference.describe()  # fails early on a reference the network does not take
    parts["feature_network"] = context.network.identity()
    given = {k: v for k, v in generation.fields().items() if k not in ("ar_steps", "step_sizes", "schedule")}
    parts["generation"] = {"num": num, "ar_steps": ar_steps, **{k: _jsonable(v) for k, v in given.items()}}
    parts["generation"].update(network_precision(pipe.model, generation.precision).record())
    prompts, labels = _conditions(pipe, context, num)
    if prompts is not None:
        parts["generation"]["condition"] = "held-out captions"
    for s in ar_steps:
        tick = time.perf_counter()
        samples = sample(pipe, num, SamplingOptions.of(generation, ar_steps=s),
                         context.progress(num, f"sampling S={s}"), prompts, labels, group)
        parts["seconds"][f"sampling S={s}"] = round(time.perf_counter() - tick, 2)
        if samples_out is not None:
            save_sample_set(Path(samples_out) / f"samples-S{s}.npz", samples)
        tick = time.perf_counter()
        parts["results"] += score_samples(context, metrics, samples)
        parts["seconds"][f"metrics S={s}"] = round(time.perf_counter() - tick, 2)


def _sample_share(context: EvalContext, num: int, ar_steps, generation: SamplingOptions, group) -> None:
    """A process's share of the samples of every S_eval, gathered to rank 0 (which scores them)."""
    pipe = _pipeline(context.method)
    prompts, labels = _conditions(pipe, context, num)
    for s in ar_steps:
        sample(pipe, num, SamplingOptions.of(generation, ar_steps=s), None, prompts, labels, group)


def _conditions(pipe, context: EvalContext, num: int) -> tuple[list[str] | None, torch.Tensor | None]:
    """What ``num`` samples are generated for: a text-to-image checkpoint's held-out captions
    (the first of each validation image) and their images' labels, else None (classes)."""
    if not pipe.text_conditioned:
        return None, None
    captions, labels = context.held_out_captions(num)
    return [c[0] for c in captions], labels


def _evaluate_model(parts: dict, context: EvalContext, metrics: dict, ar_steps) -> None:
    """Add the records of the metrics on the model itself (no samples) to the report's ``parts``."""
    for name, metric in metrics.items():
        tick = time.perf_counter()
        if getattr(metric, "per_ar_steps", False):
            for s in ar_steps:
                parts["results"] += _per_ar_steps_records(name, metric, context, s)
        else:
            parts["results"] += _records(name, metric(context), ar_steps=None)
        parts["seconds"][name] = round(time.perf_counter() - tick, 2)


def _evaluate_captions(parts: dict, context: EvalContext, metrics: dict, *, num: int, batch_size: int,
                       seed: int) -> None:
    """Caption ``num`` validation images greedily and add the caption metrics' records (and the
    decoding) to the report's ``parts``."""
    tick = time.perf_counter()
    predictions, references = caption_held_out(context, num, batch_size, seed)
    parts["captioning"] = {"num": len(predictions), "decoding": "greedy"}
    for name, metric in metrics.items():
        parts["results"] += _records(name, metric.score(predictions, references), ar_steps=None)
    parts["seconds"]["captioning"] = round(time.perf_counter() - tick, 2)


def score_samples(context: EvalContext, metrics, samples: SampleSet) -> list[Record]:
    """The ``Record`` s (``ar_steps`` = ``samples.ar_steps``) of sample metrics on ``samples``;
    ``metrics`` are names or ``{name: metric}`` as ``build_metrics`` gives. A metric that does
    not apply gives one record with value None and the reason under ``skipped``."""
    built = metrics if isinstance(metrics, dict) else build_metrics(list(metrics))
    others = [name for name, metric in built.items() if metric.needs != "samples"]
    if others:
        raise MetricError(f"metric(s) {', '.join(others)} do not score samples; score_samples takes "
                          "metrics whose needs is 'samples'")
    records = []
    for name, metric in built.items():
        reason = _skip_reason(metric, context)
        if reason is None:
            records += _records(name, metric(context, samples), ar_steps=samples.ar_steps)
        else:
            records.append(_skipped(name, samples.ar_steps, reason))
    return records


def _per_ar_steps_records(name: str, metric, context, ar_steps: int) -> list[Record]:
    """Records of a model metric at one S_eval; a MetricSkipped there is a skipped record."""
    try:
        return _records(name, metric(context, ar_steps=ar_steps), ar_steps=ar_steps)
    except MetricSkipped as reason:
        say(f"skipped {name} at S_eval={ar_steps}: {reason}")
        return [_skipped(name, ar_steps, str(reason))]


def _skipped(metric: str, ar_steps: int | None, reason: str) -> Record:
    return Record(metric, None, None, ar_steps, skipped=reason)


def _skip_reason(metric, context) -> str | None:
    if metric.needs == "captions" and not can(context.method, CAPTIONING):
        return ("scores generated captions against references: use cfkit cider PREDICTIONS.json "
                "REFERENCES.json (cfkit eval samples class-conditional images)")
    check = getattr(metric, "check", None)
    try:
        if check is not None:
            check(context)
    except MetricSkipped as reason:
        return str(reason)
    return None


def _pipeline(method):
    from cfkit.pipeline import Pipeline

    pipe = Pipeline(method)
    if pipe.tokenizer is None:
        raise MetricError("image metrics need images: this checkpoint's image tokenizer does not "
                          "decode its latents")
    return pipe


def _records(metric: str, values: dict[str, float], ar_steps: int | None) -> list[Record]:
    return [Record(metric, name, _jsonable(float(value)), ar_steps) for name, value in values.items()]


def _jsonable(value):
    """``value`` as strict JSON has it: non-finite floats as strings ("inf"), objects as repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def sample(pipe, num: int, options: SamplingOptions, progress=None,
           prompts: list[str] | None = None, labels: torch.Tensor | None = None,
           group=None) -> SampleSet | None:
    """``num`` images sampled with ``options`` for the classes ``0, 1, ..., K-1, 0, ...`` or,
    text-to-image, for ``prompts`` (with their images' ``labels``): image i drawn from (seed,
    i), ``options.batch_size`` at a time (``Pipeline.sample_set``); ``progress(n)`` after each
    n images. Under a process ``group`` the processes share the batches and rank 0 alone gets
    the set (the others None)."""
    if num < 2:
        raise MetricError(f"--num must be >= 2 (statistics of one image are undefined), got {num}")
    if prompts is None:
        labels = torch.arange(num) % pipe.model.config.num_classes
    condition = {"classes": labels} if prompts is None else {"prompts": prompts}
    batches = []
    for _, batch in pipe.sample_set(options, **condition, group=group):
        batches.append(batch)
        if progress is not None:
            progress(len(batch))
    if group is not None and not group.is_main:
        return None
    # one memory layout however the batches came, so that feature networks compute alike
    images = torch.cat(batches).permute(0, 3, 1, 2).contiguous()
    return SampleSet(images, labels, options.ar_steps)


def caption_held_out(context, num: int, batch_size: int, seed: int = 0) -> tuple[dict, dict]:
    """Greedy captions ``{i: caption}`` of the first ``num`` validation images and their
    reference captions ``{i: [caption, ...]}``; batch ``b`` decoded with seed ``seed + b``."""
    pipe = _pipeline(context.method)
    images = context.dataset_images("val")[0][:num]
    references, _ = context.held_out_captions(len(images))
    bar = context.progress(len(images), "captioning")
    predictions = []
    for b, start in enumerate(range(0, len(images), batch_size)):
        chunk = from_uint8(images[start:start + batch_size].permute(0, 2, 3, 1).numpy())
        predictions += pipe.caption(chunk.to(context.device), seed=seed + b)
        bar(len(chunk))
    return dict(enumerate(predictions)), dict(enumerate(references))


def save_sample_set(path: Path, samples: SampleSet) -> None:
    import numpy as np

    arrays = {"arr_0": samples.images.permute(0, 2, 3, 1).numpy(), "labels": samples.labels.numpy()}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    checkpoint.atomic_write(path, write)


# -- reports --------------------------------------------------------------------------------
def write_report(report: EvalReport, out) -> list[Path]:
    """``eval.json`` (the report as a dict) and ``eval.md`` (a summary) in the folder ``out``."""
    out = Path(out)
    checkpoint.write_json(out / "eval.json", report.as_dict())
    checkpoint.atomic_write(out / "eval.md", lambda tmp: Path(tmp).write_text(summary(report)))
    return [out / "eval.json", out / "eval.md"]


def summary(report: EvalReport) -> str:
    """The report as short markdown: settings, a table per S_eval, model metrics, skips."""
    lines = [f"# Evaluation of {report.checkpoint}", ""]
    gen, dataset = report.generation, report.dataset
    if dataset is not None:
        lines.append(f"Method {report.method} on {_component(dataset)}.")
    if gen is not None:
        settings = ", ".join(f"{k} {v}" for k, v in gen.items() if k not in ("num", "ar_steps", "condition"))
        network, reference = report.feature_network, report.reference
        accuracy = network.get("held_out_accuracy")
        held_out = "" if accuracy is None else f", held-out accuracy {accuracy:.2%}"
        condition = gen.get("condition", "class-balanced")
        lines += [f"{gen['num']} samples ({condition}) per S_eval ({settings}).",
                  f"Feature network {network['name']}{held_out}; reference: "
                  f"{_reference_text(reference)}.", ""]
    results = report.results
    measured = [r for r in results if r.name is not None]
    lines += _per_s_table([r for r in measured if r.ar_steps is not None])
    for record in (r for r in measured if r.ar_steps is None):
        lines.append(f"- {record.name}: {_number(record.value)}")
    for record in (r for r in results if r.name is None):
        lines.append(f"- {record.metric} at S_eval {record.ar_steps}: skipped ({record.skipped})")
    for name, reason in report.skipped.items():
        lines.append(f"- {name}: skipped ({reason})")
    lines += ["", f"Took {report.seconds.get('total', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def _per_s_table(records: list[Record]) -> list[str]:
    """A row per S_eval, a column per value measured at every S_eval; the other values (e.g.
    per AR step) as a list below."""
    s_values = sorted({r.ar_steps for r in records})
    names = list(dict.fromkeys(r.name for r in records))
    columns = [n for n in names if {r.ar_steps for r in records if r.name == n} == set(s_values)]
    lines = []
    if columns:
        lines += ["| S_eval | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for s in s_values:
            values = {r.name: r.value for r in records if r.ar_steps == s}
            lines.append(f"| {s} | " + " | ".join(_number(values.get(c)) for c in columns) + " |")
        lines.append("")
    lines += [f"- {r.name} (S_eval {r.ar_steps}): {_number(r.value)}"
              for r in records if r.name not in columns]
    return lines


def _reference_text(reference: dict) -> str:
    """"the train split (1437 images)" or "FILE (10000 images; mu, sigma, arr_0)"."""
    if "split" in reference:
        return f"the {reference['split']} split ({reference['num']} images)"
    count = "statistics" if reference["num"] is None else f"{reference['num']} images"
    return f"{reference['file']} ({count}; {', '.join(reference['holds'])})"


def _component(spec: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return spec["name"] + (f" ({options})" if options else "")


def _number(value) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.4g}"


# -- cfkit fid -------------------------------------------------------------------------------
def feature_network(features: str | None, feature_options: dict | None, device: str):
    """The feature network ``features`` (default: the one declared the default) on ``device``."""
    name = default_feature_network() if features is None else features
    return plugins.build("feature_networks", name, **dict(feature_options or {})).to(device)


def set_statistics(path, network, batch_size: int = 250, show_progress: bool = True):
    """``(Statistics, description)`` of a folder of images, an image ``.npz`` or a statistics
    ``.npz`` (``mu``, ``sigma``: must come from ``network``); images are checked by it."""
    if is_statistics_file(path):
        statistics = load_statistics(path, network)
        return statistics, f"statistics of {statistics.num}"
    statistics, _, shape = image_statistics(path, network, batch_size, show_progress, spatial=False)
    return statistics, shape


def image_statistics(path, network, batch_size: int = 250, show_progress: bool = True,
                     spatial: bool = True):
    """``(Statistics, spatial Statistics or None, (N, C, H, W))`` of the pool and (when
    ``spatial`` and the network has them) spatial features of a folder of images or an image
    ``.npz``; FID alone skips the spatial features' covariance."""
    images = read_images(path)
    bar = progress_bar(len(images), f"features {Path(path).name}", show_progress)
    extracted = extract(network, images, batch_size, bar)
    spatial = None if extracted.spatial is None or not spatial else Statistics.of(extracted.spatial)
    return Statistics.of(extracted.features), spatial, tuple(images.shape)


def fid_between(path_a, path_b, features: str | None = None, feature_options: dict | None = None,
                batch_size: int = 250, show_progress: bool = True, device: str = "cpu") -> dict:
    """FID between two sets (folders of images, image or statistics ``.npz`` files) on the
    feature network ``features`` (default: the one declared the default)."""
    network = feature_network(features, feature_options, device)
    a, shape_a = set_statistics(path_a, network, batch_size, show_progress)
    b, shape_b = set_statistics(path_b, network, batch_size, show_progress)
    if isinstance(shape_a, tuple) and isinstance(shape_b, tuple) and shape_a[1:] != shape_b[1:]:
        raise MetricError(f"{path_a} holds {shape_a[1:]} images and {path_b} {shape_b[1:]} images "
                          "(C, H, W); FID compares sets of one image size")
    return {"name": f"FID ({network.name})", "value": frechet_distance(a, b),
            "feature_network": network.identity(), "num": [a.num, b.num]}


def save_statistics(path, out, features: str | None = None, feature_options: dict | None = None,
                    batch_size: int = 250, show_progress: bool = True, device: str = "cpu") -> Statistics:
    """Write the statistics of a set of images as ``out`` (``mu``, ``sigma``, pytorch-fid's
    keys, and from a network with spatial features sFID's ``mu_s``, ``sigma_s``, the ADM
    evaluator's)."""
    network = feature_network(features, feature_options, device)
    if is_statistics_file(path):
        raise MetricError(f"{path} holds statistics already; --save-stats takes a folder of images or "
                          "an image .npz (arr_0)")
    statistics, spatial, _ = image_statistics(path, network, batch_size, show_progress)
    statistics.save(out, spatial, feature_network=network.name,
                    feature_identity=json.dumps(network.identity(), sort_keys=True))
    return statistics
