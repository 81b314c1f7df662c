"""Time generation's diffusion steps: the KV-cached sampler against its baselines.

The issue's setting (CausalFusion-S on 32x32x4 latents at patch 2), e.g.

    python benchmarks/perf/sample.py --method causalfusion --hidden 384 --depth 12 --heads 6 \
        --batch 8 --latent 32 --patch 2 --dtype bf16 --ar-steps 16 --steps 250 --cfg 4 \
        --measure 3 --json

A diffusion step is one guided network evaluation of one AR step's tokens (conditional and
unconditional rows in one batch) plus the sampler's update. The run times ``--measure`` steps
(after ``--warmup`` untimed ones) of AR step S // 2 of a generation with ``--steps`` T per AR
step, the cache then holding the clean tokens of every step before it (the mean context of
a whole generation; the cost does not depend on the tokens' values, so they are random).
``images_per_s`` = batch / (median_step_s * T * S); the one clean-token push per AR step is
not counted. Baselines in the same run: the reference-style loop (S = 1, eager attention,
fp32, CFG by the 2N batch) gives ``speedup_vs_reference`` (ratio of images/s), and the
uncached path at the same S (the context recomputed by the full training forward every
diffusion step) gives ``cached_speedup``. The three run in ``--rounds`` rounds, in turn and in
the reverse order every other round, and each ratio is the median of the rounds' ratios: a
shared machine's speed drifts over minutes, and a round's runs sit close together in time.
``--profile`` runs one more diffusion step of the cached path and of the reference under the
profiler, in the first round: their time split
(``cfkit.perf.breakdown``) and the speed-up the cached path would reach over the reference if
everything but its matmuls and attention took no time. One JSON object goes to stdout with ``--json``;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch

from cfkit import config as configs
from cfkit import preflight
from cfkit.generate import (
    CachedContext,
    RecomputedContext,
    ar_step_sizes,
    build_component,
    generation_order,
    guidance_for,
    reverse_process,
)
from cfkit.perf import breakdown
from cfkit.perf.machine import auto_precision, log, machine, model_options, network_parser, synchronize
from cfkit.samplers import noise_like, respaced

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Measured(Exception):
    """Raised by the step callback once every timed step has run: the rest of the
    generation is not needed."""


def build_model(args, attention: str | None, device: torch.device):
    """The method with a random-init network of the benchmark's size (same weights per seed)."""
    model = model_options(args, attention)
    torch.manual_seed(args.seed)
    method = configs.validate({"name": "perf-sample", "method": {"name": args.method},
                               "model": model}).build_method()
    method.model.to(device).eval()
    return method


def measure(args, ar_steps: int, cached: bool, attention: str | None, dtype: str,
            device: torch.device, profile: bool = False) -> dict:
    """Median time of ``args.measure`` diffusion steps at AR step S // 2 (see the module doc);
    with ``profile``, the time split of one more step (``profile``)."""
    method = build_model(args, attention, device)
    model, config = method.model, method.model.config
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, config.num_classes, (args.batch,), generator=generator).to(device)
    guidance = guidance_for(model, args.cfg, (0, math.inf))
    order = generation_order("random", args.batch, config.grid, generator).to(device)
    sizes = ar_step_sizes(config.num_tokens, ar_steps)
    diffusion = respaced(method.diffusion, args.steps)
    sampler = build_component("samplers", args.sampler)
    step = len(sizes) // 2
    start, size = int(sizes[:step].sum()), int(sizes[step])
    span = slice(start, start + size)
    times, last = [], [0.0]
    profiler = breakdown.Profiler(device) if profile else None
    split: list[breakdown.Breakdown] = []
    label = (f"{'cached' if cached else 'uncached'} S={ar_steps} {dtype} "
             f"attention={attention or 'default'}")

    def on_step():
        timed = args.warmup + args.measure
        if len(times) == timed:  # the profiled step, after the timed ones
            split.append(profiler.stop())
            log(f"  {label} profiled step: {split[0].wall_s:.3f} s")
            raise Measured
        synchronize(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        log(f"  {label} step {len(times)}/{timed}"
            f"{' (warmup)' if len(times) <= args.warmup else ''}: {times[-1]:.3f} s")
        if len(times) == timed:
            if profiler is None:
                raise Measured
            profiler.start()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.no_grad(), autocast, contextlib.suppress(Measured):
        if cached:
            context = CachedContext(model, labels, order, guidance)
        else:
            context = RecomputedContext(model, labels, order, sizes, guidance)
        tokens = torch.randn(args.batch, config.num_tokens, config.token_dim, generator=generator)
        if start:
            context.add(tokens[:, :start].to(device), slice(0, start))
        x = noise_like(tokens[:, span].to(device), generator)
        synchronize(device)
        last[0] = time.perf_counter()
        reverse_process(lambda x_t, t: context.predict(x_t, span, t), diffusion, sampler, x,
                        method.prediction, generator, on_step)
    timed = times[args.warmup:]
    median = statistics.median(timed)
    return {**({"profile": split[0].record()} if split else {}),
        "cached": cached,
        "dtype": dtype,
        "attention": attention or "default",
        "ar_steps": ar_steps,
        "ar_step_measured": step,
        "context_tokens": start,
        "step_tokens": size,
        "median_step_s": median,
        "step_s": timed,
        "images_per_s": args.batch / (median * args.steps * ar_steps),
    }


def parser() -> argparse.ArgumentParser:
    p = network_parser(__doc__.split("\n\n")[0], DTYPES)
    p.add_argument("--ar-steps", type=int, default=1, help="AR steps S")
    p.add_argument("--steps", type=int, default=250, help="diffusion steps T per AR step")
    p.add_argument("--cfg", type=float, default=4.0, help="CFG scale (1 = none)")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--measure", type=int, default=3, help="timed diffusion steps per round")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of the cached path and its baselines, in turn (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed diffusion steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference-style baseline (S = 1, eager attention, fp32)")
    p.add_argument("--no-uncached", action="store_true", help="skip the uncached baseline")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step of the cached path and the reference")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: at least 1")
    report = {
        "device": device.type if device.type != "cuda" else torch.cuda.get_device_name(device),
        **machine(),
        **auto_precision(device, args.hidden),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }
    variants = {"cached": (args.ar_steps, True, args.attention, args.dtype, args.profile)}
    if not args.no_reference:
        variants["reference"] = (1, True, "eager", "fp32", args.profile)
    if not args.no_uncached:
        variants["uncached"] = (args.ar_steps, False, args.attention, args.dtype, False)
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        log(f"round {round_ + 1}/{args.rounds}: {', '.join(names)}")
        for name in names:
            ar_steps, cached, attention, dtype, profile = variants[name]
            rounds[name].append(measure(args, ar_steps, cached, attention, dtype, device,
                                        profile and round_ == 0))
    report.update(pooled(rounds["cached"]))
    if "reference" in rounds:
        report["reference"] = pooled(rounds["reference"])
        report["speedup_by_round"] = [ours["images_per_s"] / reference["images_per_s"] for ours, reference
                                      in zip(rounds["cached"], rounds["reference"], strict=True)]
        report["speedup_vs_reference"] = statistics.median(report["speedup_by_round"])
        if args.profile:
            report["speedup_bound_vs_reference"] = breakdown.speedup_bound(
                report["speedup_vs_reference"], report["profile"])
    if "uncached" in rounds:
        report["uncached"] = pooled(rounds["uncached"])
        report["cached_speedup_by_round"] = [
            uncached["median_step_s"] / ours["median_step_s"]
            for ours, uncached in zip(rounds["cached"], rounds["uncached"], strict=True)]
        report["cached_speedup"] = statistics.median(report["cached_speedup_by_round"])
    return report


def pooled(rounds: list[dict]) -> dict:
    """One variant's rounds as one entry: its timed steps of every round, their median, and the
    first round's profile."""
    steps = [t for r in rounds for t in r["step_s"]]
    median = statistics.median(steps)
    first = rounds[0]
    images_per_step = first["images_per_s"] * first["median_step_s"]  # batch / (T S)
    return {**first, "median_step_s": median, "step_s": steps, "images_per_s": images_per_step / median,
            "median_step_s_by_round": [r["median_step_s"] for r in rounds]}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.latent % args.patch:
        raise SystemExit(f"--patch {args.patch} does not divide --latent {args.latent}")
    used = args.warmup + args.measure + args.profile
    if used > args.steps:
        raise SystemExit(f"--warmup + --measure{' + 1 (--profile)' if args.profile else ''} ({used}) "
                         f"must be <= --steps ({args.steps}): only the steps of one AR step are timed")
    if args.measure < 1:
        raise SystemExit("--measure must be >= 1")
    preflight.keep_freed_memory()  # as `cfkit sample` runs: every variant in this process
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        for key in ("median_step_s", "images_per_s", "speedup_vs_reference", "cached_speedup"):
            if key in report:
                print(f"{key}: {report[key]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
