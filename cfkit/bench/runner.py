"""Running a bench: train every run, evaluate it, score the baselines. Everything here writes
files only (the report, ``cfkit.bench.report``, reads them):

    runs/<experiment key>/                      the run folder (cfkit train's)
        bench-run.json                          training seconds, counted FLOPs, machine
        bench-eval/<evaluation key>/
            records.json                        metric records (written last: marks it done)
            feature-network.json                the feature network's identity
            figure4.json                        AR step sizes the training schedule draws
            editing.npz | editing-none.txt      the editing example, or why there is none
            cfg<scale>/samples-S<S>.npz         the evaluated samples
    baselines/<name>-<key>/records.json         a baseline's records, per dataset

Under torchrun every process trains each run; rank 0 alone evaluates and reports.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cfkit import checkpoint, distributed, evaluate, preflight, runlock
from cfkit import train as training
from cfkit.bench import report as reporting
from cfkit.bench.schema import (
    EDIT_ROWS,
    Bench,
    Evaluation,
    Overrides,
    Run,
    baseline_folder,
    baseline_key,
    eval_folder,
    load,
)
from cfkit.flops import FLOPS_COUNTED, training_flops
from cfkit.generate import GenerationError, SamplingOptions, denoises_whole_image
from cfkit.methods import AR_PLANS, TEXT_CONDITIONING, can
from cfkit.pipeline import Pipeline
from cfkit.progress import say


def run_bench(path, out, overrides=(), progress: bool = True, report_only: bool = False,
              shard: tuple[int, int] = (0, 1), jobs: int = 1) -> dict:
    """Train and evaluate every run of the bench at ``path`` into ``out`` (skipping what is
    done), score its baselines, then write the report; returns ``results.json``'s content.
    ``overrides``: ``--set`` texts (``evaluation.KEY=VALUE`` ones change the evaluation).
    ``report_only`` trains and evaluates nothing: the report of the runs finished so far (a
    long grid's progress). ``shard`` ``(i, n)`` trains and evaluates only runs ``i, i + n,
    ...`` (n independent processes or machines share a grid; the report has every finished
    run; shard 0 scores the baselines). ``jobs`` > 1 trains and evaluates that many runs at
    a time in worker processes on this machine, each on its share of the CPU threads: small
    models use one core far better than two, so two one-thread jobs on two cores finish a
    grid in about half the time."""
    part, parts = shard
    if not 0 <= part < parts:
        raise ValueError(f"shard {part}/{parts}: give I/N with 0 <= I < N, e.g. 0/2")
    if jobs < 1:
        raise ValueError(f"jobs: give a number of processes >= 1, got {jobs}")
    started = time.perf_counter()
    overrides = overrides if isinstance(overrides, Overrides) else Overrides.split(overrides)
    bench, runs = load(path, overrides)
    out = Path(out)
    # Under torchrun every process trains each run (DDP or FSDP as configured); rank 0 alone
    # evaluates and reports while the others wait, for as long as evaluation takes.
    group = distributed.Distributed(timeout=datetime.timedelta(days=1))
    main = group.is_main
    if jobs > 1 and group.world_size > 1:
        group.close()
        raise ValueError("--jobs starts processes on this machine; under torchrun give --jobs 1")
    held = contextlib.ExitStack()
    try:
        if not report_only:  # a report of the progress may be written beside a running bench
            held.enter_context(runlock.hold(out, lock_file(shard)))
        if main:
            out.mkdir(parents=True, exist_ok=True)
            reporting.recover(out)
        if main and not report_only and part == 0:
            # First: cheap, and a grid stopped part-way still reports its models against them.
            score_baselines(bench.evaluation, runs, out, progress, str(group.device))
        mine = [run.key for index, run in enumerate(runs) if not report_only and index % parts == part]
        if jobs > 1:
            run_parallel(path, out, overrides, mine, jobs)
            mine = []
        run_here(bench, runs, mine, out, progress, group)
        if not main:
            return {}
        # Gathered after the loop: other shards finish runs while this one trains its own.
        results = reporting.write_report(path, bench, runs, out, overrides, processes=group.world_size,
                                         started=started)
        if report_only:
            say(f"{len(results['runs'])} of {len(runs)} runs trained and evaluated")
        return results
    finally:
        held.close()
        group.close()


def run_here(bench: Bench, runs: list[Run], keys: list[str], out: Path, progress: bool,
             group: distributed.Distributed) -> None:
    """Train and evaluate the runs of ``keys`` in this process (every rank trains, rank 0
    evaluates)."""
    main = group.is_main
    for index, run in enumerate(runs, 1):
        if run.key not in keys:
            continue
        if main:
            say(f"[{index}/{len(runs)}] {run.label}, seed {run.seed} ({run.key})")
        train_run(run, run.folder(out), progress and main, main, str(group.device))
        if main:
            evaluate_run(run, run.folder(out), bench.evaluation, progress, str(group.device))
        distributed.barrier()


def lock_file(shard: tuple[int, int]) -> str:
    """The lock file of a bench folder: one per shard, as the shards of a grid share it."""
    part, parts = shard
    return runlock.LOCK_FILE if parts == 1 else f".cfkit-shard-{part}-of-{parts}.lock"


def run_parallel(path, out: Path, overrides: Overrides, keys: list[str], jobs: int) -> None:
    """Train and evaluate the runs ``keys`` of the bench at ``path``, ``jobs`` tasks at a time
    in worker processes. A free worker evaluates a trained run before it trains the next one,
    so finished runs are evaluated as the grid goes (a stopped grid keeps them) and no worker
    idles while another trains and evaluates the last run."""
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    say(f"{len(keys)} runs, {jobs} tasks at a time ({threads} thread(s) each)")
    trainings, evaluations, running = list(keys), [], {}
    context = multiprocessing.get_context("spawn")  # a fresh torch in each worker
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        while trainings or evaluations or running:
            while len(running) < jobs and (trainings or evaluations):
                task, key = ("evaluate", evaluations.pop(0)) if evaluations else ("train", trainings.pop(0))
                running[pool.submit(_run_task, task, path, out, overrides, key, threads)] = (task, key)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task, key = running.pop(future)
                future.result()  # a failed task stops the bench with its error
                if task == "train":
                    evaluations.append(key)


def _run_task(task: str, path, out: Path, overrides: Overrides, key: str, threads: int) -> str:
    """``train`` or ``evaluate`` the run ``key`` in a worker process; returns ``task``."""
    torch.set_num_threads(threads)
    preflight.keep_freed_memory()  # a spawned worker starts with glibc's defaults
    bench, runs = load(path, overrides)
    run = next(run for run in runs if run.key == key)
    say(f"[{runs.index(run) + 1}/{len(runs)}] {task} {run.label}, seed {run.seed} ({run.key})")
    if task == "train":
        train_run(run, run.folder(out), progress=False)
    else:
        evaluate_run(run, run.folder(out), bench.evaluation, False)
    return task


def machine(device: str = "cpu") -> dict:
    """What trained: the device (GPU name, or the CPU's vector capability) and torch threads."""
    if torch.device(device).type == "cuda":
        return {"device": torch.cuda.get_device_name(torch.device(device)),
                "threads": torch.get_num_threads()}
    return {"device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def train_run(run: Run, folder: Path, progress: bool, main: bool = True, device: str = "cpu") -> None:
    """Train ``run`` into ``folder`` unless done; resume it when a checkpoint exists; record
    in ``bench-run.json`` the training seconds (all attempts), the counted training FLOPs
    (``cfkit.flops``) and the machine. Every process of a torchrun calls it; ``main`` (rank
    0) alone changes files outside the trainer."""
    record = folder / "bench-run.json"
    target = run.experiment.train.max_steps
    done = checkpoint.checkpoints(folder)
    if done and int(done[-1].name.split("-")[-1]) >= target and record.exists():
        if main:
            say("  trained already")
            recorded = json.loads(record.read_text())
            if "train_flops" not in recorded:  # a run recorded before FLOPs were counted
                write_json(record, {**recorded, **training_flops(run.experiment).record(),
                                    "flops_counted": FLOPS_COUNTED})
        return
    if main:
        if not done and folder.exists():
            shutil.rmtree(folder)  # an attempt that never reached a checkpoint holds nothing to keep
        shutil.rmtree(folder / "bench-eval", ignore_errors=True)  # of weights about to change
        say(f"  training {target} steps" + (f" from {done[-1].name}" if done else ""))
    distributed.barrier()
    tick = time.perf_counter()
    training.train(run.experiment, folder, resume=bool(done), progress=progress)
    seconds = round(time.perf_counter() - tick, 1)
    if main:
        if done and record.exists():
            seconds += json.loads(record.read_text()).get("train_seconds") or 0.0
        write_json(record, {"key": run.key, "label": run.label, "seed": run.seed, "max_steps": target,
                            "train_seconds": seconds, **training_flops(run.experiment).record(),
                            "flops_counted": FLOPS_COUNTED, "machine": machine(device)})


def evaluate_run(run: Run, folder: Path, spec: Evaluation, progress: bool, device: str = "cpu") -> None:
    """Evaluate ``run`` into ``bench-eval/<evaluation key>/`` unless done: the records ``{metric,
    name, value, ar_steps, cfg}`` (sample metrics at every S_eval and CFG scale with the
    evaluation's seed, the same for every run; model metrics once, with the S_eval values for
    those that take one), the feature network's identity, figure 4's AR step sizes and the
    editing example. A setting the method cannot sample (DiT in several AR steps) gets a
    record with value None and the reason. ``records.json`` is written last."""
    folder_out = eval_folder(folder, spec)
    records_path = folder_out / "records.json"
    if records_path.exists():
        say("  evaluated already")
        return
    built = evaluate.build_metrics(spec.metrics)
    on_samples = [name for name, metric in built.items() if metric.needs == "samples"]
    others = [name for name in built if name not in on_samples]
    common = dict(num=spec.num, features=spec.features, batch_size=spec.batch_size, progress=progress,
                  device=device, reference_split=spec.reference_split)
    records: list[dict] = []
    for cfg, s in itertools.product(spec.cfg, spec.ar_steps):
        if not on_samples:
            break
        say(f"  evaluating S_eval={s}, cfg={cfg}")
        generation = spec.sampling_options(cfg)
        try:
            found = evaluate.evaluate(folder, on_samples, ar_steps=[s], generation=generation,
                                      samples_out=folder_out / f"cfg{cfg:g}", **common)
        except GenerationError as error:
            records += [{"metric": m, "name": None, "value": None, "ar_steps": s, "cfg": cfg,
                         "skipped": str(error)} for m in on_samples]
            continue
        if found.feature_network:
            write_json(folder_out / "feature-network.json", found.feature_network)
        records += [{**r.as_dict(), "cfg": cfg} for r in found.results]
    if others:
        say(f"  evaluating {', '.join(others)}")
        found = evaluate.evaluate(folder, others, ar_steps=spec.model_s, generation=spec.sampling_options(),
                                  **common)
        records += [{**r.as_dict(), "cfg": None} for r in found.results]
        records += [{"metric": m, "name": None, "value": None, "ar_steps": None, "cfg": None,
                     "skipped": why} for m, why in found.skipped.items()]
    method = checkpoint.load(checkpoint.resolve(folder))
    write_json(folder_out / "figure4.json", step_size_counts(method, spec.seed))
    editing_example(method, folder_out, spec)
    write_json(records_path, records)


def step_size_counts(method, seed: int, draws: int = 2000) -> dict | None:
    """Figure 4's left panel for one run: how many of the AR steps that its training schedule
    draws (``draws`` images) hold each number of tokens |κ_s|; None for a method without AR
    steps. (Its right panel, the held-out loss per AR step, is the heldout-loss records.)"""
    if (not can(method, AR_PLANS) or denoises_whole_image(method.model)
            or can(method.model, TEXT_CONDITIONING)):
        return None
    from cfkit.schedules import draw_steps

    length = method.config.num_tokens
    generator = torch.Generator().manual_seed(seed)
    drawn = draw_steps(method.planner.schedule, length, draws, generator, True)
    sizes = torch.cat([torch.bincount(row) for row in drawn])  # |κ_s| of every drawn AR step
    counts = torch.bincount(sizes, minlength=length + 1)
    return {"step_size_counts": {str(k): int(c) for k, c in enumerate(counts.tolist()) if c},
            "draws": draws, "num_tokens": length}


def editing_example(method, folder: Path, spec: Evaluation, num: int = 8) -> None:
    """``editing.npz``: ``num`` held-out images (``source``), each with its top half and its
    centre kept and the rest regenerated for the next class (``kept top``, ``kept centre``),
    and a fresh sample of that class (``regenerated``), uint8 ``(N, H, W, C)`` each, with the
    ``labels`` and the ``new_labels``; or ``editing-none.txt`` saying why the model cannot edit."""
    try:
        pipe = Pipeline(method)
        if pipe.tokenizer is None or pipe.text_conditioned or denoises_whole_image(pipe.model):
            raise GenerationError("this model cannot edit: it needs a class-conditional causal "
                                  "model whose tokenizer decodes")
    except GenerationError as error:
        text = f"{error}\n"
        checkpoint.atomic_write(folder / "editing-none.txt", lambda tmp: Path(tmp).write_text(text))
        return
    images, labels = evaluate.EvalContext(method, show_progress=False).dataset_images("val")
    images, labels = images[:num].float() / 127.5 - 1, labels[:num]
    new = (labels + 1) % pipe.model.config.num_classes
    options = SamplingOptions(steps=spec.steps, order=spec.order, cfg=max(spec.cfg), seed=spec.seed)
    rows = [images] + [pipe.edit(images, keep, new, options) for keep in ("top", "centre")]
    rows.append(pipe.generate(new, options))
    arrays = {name: ((r.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
              for name, r in zip(EDIT_ROWS, rows, strict=True)}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, labels=labels.numpy(), new_labels=new.numpy(), **arrays)

    checkpoint.atomic_write(folder / "editing.npz", write)


def score_baselines(spec: Evaluation, runs: list[Run], out: Path, progress: bool,
                    device: str = "cpu") -> None:
    """Score each of ``spec.baselines`` once per dataset of the runs and per S_eval with the
    evaluation's sample metrics and seed, into ``baselines/<name>-<key>/records.json``
    unless there (a baseline that is no AR sampler once, its records repeated at every
    S_eval). Its token size is the patch size of the first run on that dataset; the
    context-blind-ar baseline always takes ``spec.baseline_ar_steps`` AR steps."""
    if not spec.baselines:
        return
    from cfkit.baselines import baseline_samples

    built = evaluate.build_metrics(spec.metrics)
    on_samples = {name: metric for name, metric in built.items() if metric.needs == "samples"}
    experiments = {}
    for run in runs:
        experiments.setdefault(baseline_key(run.experiment, spec), run.experiment)
    for experiment, name in itertools.product(experiments.values(), spec.baselines):
        path = baseline_folder(out, name, experiment, spec) / "records.json"
        if path.exists() or not on_samples:
            continue
        say(f"baseline {name}: scoring S_eval {', '.join(map(str, spec.ar_steps))}")
        context = evaluate.EvalContext.for_experiment(
            experiment, features=spec.features, reference_split=spec.reference_split,
            batch_size=spec.batch_size, device=device, show_progress=progress)
        # Scored once and shown at every S_eval: the context-blind sampler in a fixed number
        # of AR steps (in one it would copy a real image), the others are no AR samplers.
        samples = baseline_samples(name, context.dataset, spec.num, ar_steps=spec.baseline_ar_steps,
                                   patch_size=patch_size(experiment), seed=spec.seed)
        scored = evaluate.score_samples(context, on_samples, samples)
        records = [{**r.as_dict(), "ar_steps": s, "cfg": None, "baseline": name}
                   for s in spec.ar_steps for r in scored]
        write_json(path, records)


def patch_size(experiment) -> int:
    """The patch size of the experiment's network: pixels per token side."""
    with torch.device("meta"):  # the config without allocating the weights
        return experiment.build_method().model.config.patch_size


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=1) + "\n"
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))
