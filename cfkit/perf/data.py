"""Time the shard loader against the training step it feeds (the digits-tiny preset).

The config's dataset is written to temp shards twice: as pixels (PNG) and as cached latents
(fp16 ``.npy`` from the config's image tokenizer). The loader (``cfkit.data.ShardStream``
through ``cfkit.data.loader``, with the config's batch size, shuffle buffer, flip and
workers) is timed over ``--batches`` batches, which run across epoch ends, after ``--warmup``
untimed ones (the shuffle buffer fills there); the median of ``--repeats`` runs is reported.
In the same run, the config's training step is timed on a loaded batch: forward + loss,
backward, gradient clipping and AdamW (the trainer also updates an EMA, left out here, which
makes the step look faster and the target harder). The loader must not be the bottleneck:
samples/s of the slower loader over training samples/s >= 5.

    python benchmarks/perf/data.py --json

One JSON object goes to stdout with ``--json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cfkit import config as configs
from cfkit import data
from cfkit.methods import Batch
from cfkit.perf.machine import log, machine

# The default experiment comes with a source checkout (an editable install finds it); an
# installed copy without one gets --config.
CONFIG = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "digits-tiny.toml"
TARGET_RATIO = 5.0


def loader_rate(shards: Path, experiment, args) -> dict:
    """Median samples/s of the shard loader over ``args.repeats`` runs of ``args.batches``."""
    spec = experiment.data
    rates = []
    for repeat in range(args.repeats):
        stream = data.ShardStream(shards, args.batch, seed=repeat, shuffle_buffer=spec.shuffle_buffer,
                                  flip=spec.flip)
        batches = iter(data.loader(stream, args.workers))
        for _ in range(args.warmup):
            next(batches)
        start, samples = time.perf_counter(), 0
        for _ in range(args.batches):
            item = next(batches)
            samples += len(item["labels"])
        rates.append(samples / (time.perf_counter() - start))
        log(f"  {shards.name}: {rates[-1]:.0f} samples/s")
        del batches  # stops the workers
    return {"samples_per_s": statistics.median(rates), "runs_samples_per_s": rates,
            "errors": {"shards": stream.errors.shards, "samples": stream.errors.samples}}


def train_rate(experiment, batch: Batch, args) -> dict:
    """Median seconds and samples/s of the config's training step on ``batch``."""
    torch.manual_seed(experiment.seed)
    cfg = experiment.train
    method = experiment.build_method()
    model = method.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=cfg.betas,
                                  eps=cfg.eps, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(experiment.seed)
    times = []
    for step in range(args.train_warmup + args.train_steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = method.loss(batch, generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if step >= args.train_warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    log(f"  train step: {median * 1e3:.1f} ms, {args.batch / median:.0f} samples/s")
    return {"median_step_s": median, "step_s": times, "samples_per_s": args.batch / median}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG),
                   help="experiment (default: benchmarks/configs/digits-tiny.toml of the checkout)")
    p.add_argument("--batch", type=int, help="batch size (default: the config's train.batch_size)")
    p.add_argument("--workers", type=int, help="loader workers (default: the config's num_workers)")
    p.add_argument("--batches", type=int, default=100, help="timed loader batches per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed loader batches first")
    p.add_argument("--repeats", type=int, default=3, help="loader runs (median reported)")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps")
    p.add_argument("--train-warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on a "
                   "loaded machine 1 avoids OpenMP waits that slow the training step")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    experiment = configs.load(args.config)
    args.batch = args.batch or experiment.train.batch_size
    args.workers = experiment.data.num_workers if args.workers is None else args.workers
    if experiment.data.dataset is None:
        raise SystemExit(f"{args.config}: the benchmark writes shards from data.dataset; it has none")
    report = {
        "what": "shard loader samples/s (pixels and cached latents) against the training step's "
                "samples/s, both measured in this run",
        "config": Path(args.config).name,
        **machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "target_ratio": TARGET_RATIO,
    }
    tokenizer = experiment.data.tokenizer.build()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = experiment.data.dataset.build()
        kinds = {"pixels": None, "latents": tokenizer}
        for kind, encoder in kinds.items():
            data.write_shards(dataset, Path(tmp) / kind, "train", experiment.data.shard_size, encoder)
        log("loader")
        for kind in kinds:
            report[f"loader_{kind}"] = loader_rate(Path(tmp) / kind, experiment, args)
        stream = data.ShardStream(Path(tmp) / "latents", args.batch, shuffle_buffer=1)
        item = next(iter(stream))
    log("training step")
    report["train"] = train_rate(experiment, Batch(item["latents"], item["labels"]), args)
    train = report["train"]["samples_per_s"]
    for kind in kinds:
        report[f"ratio_{kind}"] = report[f"loader_{kind}"]["samples_per_s"] / train
    report["ratio"] = min(report[f"ratio_{kind}"] for kind in kinds)
    report["meets_target"] = report["ratio"] >= TARGET_RATIO
    report["load_average_end"] = os.getloadavg()
    return report


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for kind in ("pixels", "latents"):
        print(f"loader ({kind}): {report[f'loader_{kind}']['samples_per_s']:.0f} samples/s, "
              f"x{report[f'ratio_{kind}']:.1f} the training step")
    print(f"training step: {report['train']['samples_per_s']:.0f} samples/s")
    print(f"ratio {report['ratio']:.1f} (target >= {TARGET_RATIO:g}): "
          f"{'ok' if report['meets_target'] else 'MISSES TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
