"""Time full training steps of a cfkit method: forward + loss, backward, clip, AdamW.

The issue's setting (CausalFusion-S on 32x32x4 latents at patch 2, bf16), with the
reference-style baseline (eager attention, fp32) measured in the same run:

    python benchmarks/perf/train_step.py --method causalfusion --hidden 384 --depth 12 \
        --heads 6 --batch 8 --latent 32 --patch 2 --dtype bf16 --steps 5 --json

``--copies K`` noises K copies per sample and, with ``--compare-incontext`` or whenever K > 1,
also times In-context DiT to give the cost per noised token relative to it. ``--peak``
times a large square matmul to give this machine's peak and the model FLOP utilisation.
One JSON object goes to stdout with ``--json``; progress goes to stderr. FLOPs are counted by
``cfkit.flops.step_flops``, the count ``cfkit bench`` records for each training run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from cfkit import config as configs
from cfkit.flops import FLOPS_COUNTED, executed_pairs, step_flops
from cfkit.methods import Batch
from cfkit.perf.machine import machine, model_options, network_parser

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def experiment(args, method: str, copies: int, attention: str | None):
    """The validated experiment: paper-default factorisation, the benchmark's network."""
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, method_name: str, copies: int, attention: str | None, dtype: str,
            device: torch.device) -> dict:
    """Median time and throughput of full training steps after ``args.warmup`` untimed ones."""
    torch.manual_seed(args.seed)
    method = experiment(args, method_name, copies, attention).build_method()
    model = method.model.to(device).train()
    probe = SequenceProbe(model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0
    )
    data = torch.Generator().manual_seed(args.seed)
    batch = Batch(
        torch.randn(args.batch, 4, args.latent, args.latent, generator=data).to(device),
        torch.randint(0, 1000, (args.batch,), generator=data).to(device),
    )
    mlp_ratio = getattr(method.config, "mlp_ratio", 4.0)
    generator = torch.Generator().manual_seed(args.seed)  # the same plans for every run
    times, flops, executed, seq_lens = [], [], [], []
    for step in range(args.warmup + args.steps):
        probe.shape = None
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = method.loss(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        synchronize(device)
        elapsed = time.perf_counter() - start
        n, seq_len, dim = probe.shape
        timed = step >= args.warmup
        log(f"  {method_name} {dtype} attention={attention or 'default'} K={copies} "
            f"step {step + 1}/{args.warmup + args.steps}{'' if timed else ' (warmup)'}: "
            f"{elapsed:.3f} s, T={seq_len}, loss {out.loss.item():.4f}")
        if timed:
            times.append(elapsed)
            shape = (n, seq_len, dim, len(model.blocks), mlp_ratio)
            flops.append(step_flops(*shape))
            executed.append(step_flops(*shape, executed_pairs(seq_len, probe.mask)))
            seq_lens.append(seq_len)
    median = statistics.median(times)
    noised = out.per_token.numel()  # (N, K, L): every noised token of the batch
    return {
        "method": method_name,
        "dtype": dtype,
        "attention": attention or "default",
        "copies": out.per_token.shape[1],
        "median_step_s": median,
        "step_s": times,
        "tflops": statistics.median(f / t for f, t in zip(flops, times, strict=True)) / 1e12,
        "flops_per_step": statistics.median(flops),
        "tflops_executed": statistics.median(f / t for f, t in zip(executed, times, strict=True)) / 1e12,
        "flops_executed_per_step": statistics.median(executed),
        "images_per_s": args.batch / median,
        "noised_tokens_per_step": noised,
        "noised_tokens_per_s": noised / median,
        "sequence_length": statistics.median(seq_lens),
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
    p = network_parser(__doc__.split("\n\n")[0], DTYPES)
    p.add_argument("--copies", type=int, default=1, help="noised copies per sample (K)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the eager-attention fp32 reference-style baseline")
    p.add_argument("--compare-incontext", action="store_true",
                   help="also time In-context DiT (always done when --copies > 1)")
    p.add_argument("--peak", action="store_true", help="also time a square matmul peak")
    p.add_argument("--peak-size", type=int, default=4096)
    p.add_argument("--peak-repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def run(args) -> dict:
    device = torch.device(args.device)
    report = {
        "device": device.type if device.type != "cuda" else torch.cuda.get_device_name(device),
        **machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "flops_counted": FLOPS_COUNTED,
    }
    log(f"{args.method} ({args.dtype}, K={args.copies})")
    result = measure(args, args.method, args.copies, args.attention, args.dtype, device)
    report.update(result)
    if args.method == "causalfusion" and not args.no_baseline:
        log("baseline: eager attention, fp32")
        baseline = measure(args, args.method, args.copies, "eager", "fp32", device)
        report["baseline"] = baseline
        report["speedup_vs_reference"] = baseline["median_step_s"] / result["median_step_s"]
    if args.compare_incontext or args.copies > 1:
        log(f"In-context DiT ({args.dtype})")
        icdit = measure(args, "incontext-dit", 1, args.attention, args.dtype, device)
        report["incontext"] = icdit
        report["cost_per_noised_token_ratio"] = (
            (result["median_step_s"] / result["noised_tokens_per_step"])
            / (icdit["median_step_s"] / icdit["noised_tokens_per_step"])
        )
    report["load_average_end"] = os.getloadavg()
    if args.peak:
        log("matmul peak")
        for name, dtype in DTYPES.items():
            layouts = matmul_peak(dtype, device, args.peak_size, args.peak_repeats)
            report[f"peak_tflops_{name}"] = max(layouts.values())
            report[f"peak_tflops_{name}_by_layout"] = layouts
        entries = [(report, args.dtype), (report.get("baseline"), "fp32"),
                   (report.get("incontext"), args.dtype)]
        for entry, dtype in entries:
            if entry is not None:
                peak = report[f"peak_tflops_{dtype}"]
                entry["mfu"] = entry["tflops"] / peak
                entry["mfu_executed"] = entry["tflops_executed"] / peak
    return report


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.latent % args.patch:
        raise SystemExit(f"--patch {args.patch} does not divide --latent {args.latent}")
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        for key in ("median_step_s", "tflops", "images_per_s", "noised_tokens_per_s",
                    "speedup_vs_reference", "cost_per_noised_token_ratio", "mfu"):
            if key in report:
                print(f"{key}: {report[key]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
