"""Time full training steps of a cfkit method: the step ``cfkit train`` runs
(``Trainer.train_step``: forward and loss in the chosen precision, backward, clip, fused AdamW,
EMA) against the reference implementation's step (eager attention, fp32, a per-parameter AdamW
loop and EMA), their steps interleaved in one run so that other load on the machine falls on
both alike, and both drawing the trainer's plan of each step, so that a round's two steps ran the
same sequence length; the speedup is the median of the rounds' ratios. The issue's setting
(CausalFusion-S on 32x32x4 latents at patch 2, bf16):

    python benchmarks/perf/train_step.py --method causalfusion --hidden 384 --depth 12 \
        --heads 6 --batch 8 --latent 32 --patch 2 --dtype bf16 --steps 5 --json

``--dtype`` is the engine's precision (``fp32``, ``bf16`` or ``auto``, which says what it chose
and why). ``--copies K`` noises K copies per sample and, with ``--compare-incontext`` or whenever K > 1,
also times In-context DiT to give the cost per noised token relative to it (the median of the
rounds' ratios, as for the speed-up). ``--compile`` also times the engine's step with
``train.compile = true`` (torch.compile of the network; its compiling falls in the warm-up
rounds, whose times the JSON keeps) and gives ``compile_speedup``, eager over compiled, paired
by round. ``--peak``
times a large square matmul before and after the steps (the best of both: a shared machine's
speed drifts) to give this machine's peak and the model FLOP utilisation. ``--profile`` runs one more round
under the profiler and gives each step's time split (``cfkit.perf.breakdown``: linear matmuls,
attention, everything else) and, from the speed-up, the one the engine would reach if
everything but its matmuls and attention took no time.
One JSON object goes to stdout with ``--json``; progress goes to stderr. FLOPs are counted by
``cfkit.flops.step_flops``, the count ``cfkit bench`` records for each training run.
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
from cfkit import preflight
from cfkit.flops import FLOPS_COUNTED, executed_pairs, step_flops
from cfkit.methods import Batch
from cfkit.perf import breakdown
from cfkit.perf.machine import auto_precision, log, machine, model_options, network_parser, synchronize
from cfkit.precision import native_bf16
from cfkit.train import Trainer, step_generator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = {**DTYPES, "auto": None}
EMULATED_PEAK_SIZE = 512  # the bf16 peak's matmul side where the CPU emulates bf16


def experiment(args, method: str, copies: int, attention: str | None, precision: str = "fp32",
               compile: bool = False):
    """The validated experiment: paper-default factorisation, the benchmark's network;
    ``compile``: ``train.compile = true``."""
    model = model_options(args, attention)
    return configs.validate({
        "name": "perf-train-step",
        "method": {"name": method},
        "model": model,
        "factorisation": {
            "schedule": {"name": "exp-decay", "gamma": 0.9},
            "ordering": {"name": "random"},
            "copies": copies,
        },
        "train": {"batch_size": args.batch, "precision": precision, "ema": 0.9999, "compile": compile},
    })


class SequenceProbe:
    """Records the ``(N, T, D)`` input of the first block and its attention mask, if any:
    what the transformer really ran."""

    def __init__(self, model: torch.nn.Module):
        self.shape: torch.Size | None = None
        self.mask = None
        model.blocks[0].register_forward_pre_hook(self._record)

    def _record(self, module, inputs):
        if self.shape is None:
            self.shape = inputs[0].shape
            self.mask = inputs[1] if len(inputs) > 1 else None


def batch_of(args, device: torch.device) -> Batch:
    data = torch.Generator().manual_seed(args.seed)
    return Batch(
        torch.randn(args.batch, 4, args.latent, args.latent, generator=data).to(device),
        torch.randint(0, 1000, (args.batch,), generator=data).to(device),
    )


class EngineStep:
    """cfkit's training step, the one ``cfkit train`` runs: ``Trainer.train_step`` (forward and
    loss in the chosen precision, backward, clip, the fused AdamW, the EMA)."""

    def __init__(self, args, method: str, copies: int, attention: str | None, precision: str,
                 device: torch.device, folder: Path, compile: bool = False):
        torch.manual_seed(args.seed)
        self.trainer = Trainer(experiment(args, method, copies, attention, precision, compile), folder)
        self.method, self.attention, self.copies = method, attention or "default", copies
        self.model = self.trainer.net.train()
        self.batch = batch_of(args, device)
        self.precision = self.trainer.precision

    def __call__(self) -> None:
        self.trainer.train_step([self.batch])


class ReferenceStep:
    """The reference implementation's step: eager attention (a dense masked softmax) in fp32,
    torch's default AdamW (a loop over the parameters) and a per-parameter EMA update."""

    def __init__(self, args, method: str, copies: int, device: torch.device):
        torch.manual_seed(args.seed)
        settings = experiment(args, method, copies, "eager")
        built = settings.build_method()
        self.loss, self.model = built.loss, built.model.to(device).train()
        self.method, self.attention, self.copies = method, "eager", copies
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15,
                                           weight_decay=0.0, foreach=False)
        self.batch = batch_of(args, device)
        # the trainer's draws: round i of both steps trains on the same plan (sequence length)
        self.seed, self.step = settings.seed, 0
        self.precision = None

    def __call__(self) -> None:
        out = self.loss(self.batch, step_generator(self.seed, self.step))
        self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        with torch.no_grad():
            for average, p in zip(self.ema, self.model.parameters(), strict=True):
                average.mul_(0.9999).add_(p, alpha=1 - 0.9999)


def measure(args, steps: dict, device: torch.device) -> dict[str, dict]:
    """Median time and throughput of each of ``steps`` (name -> step), their steps interleaved
    (one of each in turn) so that load on the machine falls on all of them alike, after
    ``args.warmup`` untimed rounds."""
    probes = {name: SequenceProbe(step.model) for name, step in steps.items()}
    records = {name: {"times": [], "flops": [], "executed": [], "seq_lens": [], "warmup": []}
               for name in steps}
    for round_ in range(args.warmup + args.steps):
        for name, step in steps.items():
            probe = probes[name]
            probe.shape = None
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            n, seq_len, dim = probe.shape
            timed = round_ >= args.warmup
            if not timed:
                records[name]["warmup"].append(elapsed)
            log(f"  {name} round {round_ + 1}/{args.warmup + args.steps}{'' if timed else ' (warmup)'}: "
                f"{elapsed:.3f} s, T={seq_len}")
            if timed:
                record = records[name]
                shape = (n, seq_len, dim, len(step.model.blocks), step.model.config.mlp_ratio)
                record["times"].append(elapsed)
                record["flops"].append(step_flops(*shape))
                record["executed"].append(step_flops(*shape, executed_pairs(seq_len, probe.mask)))
                record["seq_lens"].append(seq_len)
    return {name: summary(args, steps[name], records[name]) for name in steps}


def summary(args, step, record: dict) -> dict:
    times, median = record["times"], statistics.median(record["times"])
    model, copies = step.model, step.copies
    noised = args.batch * copies * model.config.num_tokens  # every noised token of the batch
    precision = step.precision.name if step.precision else "fp32"
    return {
        "method": step.method,
        "attention": step.attention,
        "dtype": precision,
        "precision": precision,
        "precision_reason": step.precision.reason if step.precision else "the reference's fp32",
        "copies": copies,
        "median_step_s": median,
        "step_s": times,
        "warmup_s": record["warmup"],  # the untimed rounds (a compiled step's compiling among them)
        "tflops": statistics.median(f / t for f, t in zip(record["flops"], times, strict=True)) / 1e12,
        "flops_per_step": statistics.median(record["flops"]),
        "tflops_executed": statistics.median(
            f / t for f, t in zip(record["executed"], times, strict=True)) / 1e12,
        "flops_executed_per_step": statistics.median(record["executed"]),
        "images_per_s": args.batch / median,
        "noised_tokens_per_step": noised,
        "noised_tokens_per_s": noised / median,
        "sequence_length": statistics.median(record["seq_lens"]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, repeats: int) -> dict:
    """Best throughput of a ``size``-square matmul, as ``A @ B`` or ``A @ B^T`` (some CPU
    kernels only take the fast path for one layout), TFLOPS."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = {}
    for layout, run in (("A@B", lambda: a @ b), ("A@B^T", lambda: a @ b.T)):
        run()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - start)
        best[layout] = 2 * size**3 / min(times) / 1e12
        log(f"  matmul {dtype} {size}^2 {layout}: {best[layout]:.4f} TFLOPS")
    return best


def parser() -> argparse.ArgumentParser:
    p = network_parser(__doc__.split("\n\n")[0], PRECISIONS)
    p.add_argument("--copies", type=int, default=1, help="noised copies per sample (K)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the eager-attention fp32 reference-style baseline")
    p.add_argument("--compare-incontext", action="store_true",
                   help="also time In-context DiT (always done when --copies > 1)")
    p.add_argument("--compile", action="store_true",
                   help="also time the engine's step with train.compile = true (torch.compile of "
                        "the network); its compiling falls in the --warmup rounds")
    p.add_argument("--peak", action="store_true", help="also time a square matmul peak")
    p.add_argument("--profile", action="store_true",
                   help="profile one more round: where each step's time goes")
    p.add_argument("--peak-size", type=int, default=4096)
    p.add_argument("--peak-repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def run(args) -> dict:
    device = torch.device(args.device)
    report = {
        "device": device.type if device.type != "cuda" else torch.cuda.get_device_name(device),
        **machine(),
        **auto_precision(device, args.hidden),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "flops_counted": FLOPS_COUNTED,
    }
    with tempfile.TemporaryDirectory() as folder:
        steps = {args.method: EngineStep(args, args.method, args.copies, args.attention, args.dtype,
                                         device, Path(folder) / "engine")}
        if args.method == "causalfusion" and not args.no_baseline:
            steps["reference"] = ReferenceStep(args, args.method, args.copies, device)
        if args.compile:
            steps["compiled"] = EngineStep(args, args.method, args.copies, args.attention, args.dtype,
                                           device, Path(folder) / "compiled", compile=True)
        if args.compare_incontext or args.copies > 1:
            steps["incontext-dit"] = EngineStep(args, "incontext-dit", 1, args.attention, args.dtype,
                                                device, Path(folder) / "incontext")
        before = peaks(args, device) if args.peak else None
        log(f"{', '.join(steps)}: {args.warmup} + {args.steps} interleaved rounds")
        results = measure(args, steps, device)
        if args.profile:
            add_profiles(steps, results, device)
    report.update(results.pop(args.method))
    if "reference" in results:
        report["baseline"] = results["reference"]
        # paired: both steps of a round trained on the same plan, so their ratio is free of the
        # sequence length, which changes from round to round
        report["speedup_by_round"] = [reference / engine for reference, engine in
                                      zip(report["baseline"]["step_s"], report["step_s"], strict=True)]
        report["speedup_vs_reference"] = statistics.median(report["speedup_by_round"])
        if args.profile:
            report["speedup_bound_vs_reference"] = breakdown.speedup_bound(
                report["speedup_vs_reference"], report["profile"])
    if "compiled" in results:
        compiled = report["compiled"] = results.pop("compiled")
        # paired as the speed-up: the same plan (sequence length) in a round's two steps
        report["compile_speedup_by_round"] = [eager / fast for eager, fast in
                                              zip(report["step_s"], compiled["step_s"], strict=True)]
        report["compile_speedup"] = statistics.median(report["compile_speedup_by_round"])
    if "incontext-dit" in results:
        icdit = report["incontext"] = results["incontext-dit"]
        # paired like the speed-up: a round's two steps ran back to back, so their ratio is
        # free of the machine's drift from round to round
        report["cost_ratio_by_round"] = [
            (engine / report["noised_tokens_per_step"]) / (incontext / icdit["noised_tokens_per_step"])
            for engine, incontext in zip(report["step_s"], icdit["step_s"], strict=True)]
        report["cost_per_noised_token_ratio"] = statistics.median(report["cost_ratio_by_round"])
    report["load_average_end"] = os.getloadavg()
    if args.peak:
        add_peak(args, report, device, before)
    return report


def add_profiles(steps: dict, results: dict[str, dict], device: torch.device) -> None:
    """One more round of ``steps``, each under the profiler (in the measured order, so that the
    round's steps draw the same plan): its time split goes to its entry's ``profile``."""
    log("profiled round")
    for name, step in steps.items():
        split = breakdown.profile_step(step, device)
        results[name]["profile"] = split.record()
        log(f"  {name}: {split.wall_s:.3f} s, "
            + ", ".join(f"{kind} {split.share(kind):.0%}" for kind in breakdown.CATEGORIES))


def peaks(args, device: torch.device) -> dict[str, tuple[int, dict[str, float]]]:
    """``{precision: (matmul side, {layout: TFLOP/s})}`` of the matmul peak, timed now."""
    log("matmul peak")
    out = {}
    for name, dtype in DTYPES.items():
        size = args.peak_size
        if name == "bf16" and device.type == "cpu" and not native_bf16():
            # emulated: a 2048^3 bf16 matmul took about a minute on an AVX2 CPU; the small one
            # measures the same slowness
            size = min(size, EMULATED_PEAK_SIZE)
        out[name] = size, matmul_peak(dtype, device, size, args.peak_repeats)
    return out


def add_peak(args, report: dict, device: torch.device, before: dict) -> None:
    """The matmul peaks, the best of ``before`` (``peaks`` timed before the steps) and of a second
    timing after them (a shared machine's speed drifts: on a 2-core VM one peak came out at 0.16
    TFLOP/s and another at 0.28 minutes apart, and the MFU against the low one read 112%), and
    each measured step's model FLOP utilisation against its precision's."""
    after = peaks(args, device)
    for name, (size, layouts) in after.items():
        layouts = {layout: max(tflops, before[name][1][layout]) for layout, tflops in layouts.items()}
        report[f"peak_size_{name}"] = size
        report[f"peak_tflops_{name}"] = max(layouts.values())
        report[f"peak_tflops_{name}_by_layout"] = layouts
    for entry in (report, report.get("baseline"), report.get("incontext")):
        if entry is not None:
            peak = report[f"peak_tflops_{entry['precision']}"]
            entry["mfu"] = entry["tflops"] / peak
            entry["mfu_executed"] = entry["tflops_executed"] / peak


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.latent % args.patch:
        raise SystemExit(f"--patch {args.patch} does not divide --latent {args.latent}")
    preflight.keep_freed_memory()  # as `cfkit train` runs: both steps in this process
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        for key in ("median_step_s", "tflops", "images_per_s", "noised_tokens_per_s",
                    "speedup_vs_reference", "compile_speedup", "cost_per_noised_token_ratio", "mfu"):
            if key in report:
                print(f"{key}: {report[key]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
