"""Time the transformer blocks' forward in CPU inference (a sampling step's network work)
with the MLP's first layer and tanh GELU as one oneDNN kernel (``Mlp.fused``) against the two
kernels of the reference, their rounds interleaved (each in the other order) so that other
load on the machine falls on both alike; the speed-up is the median of the rounds' ratios.
Sampling runs the fused kernel where the CPU has AVX512 (``fused_linear_gelu``); the rounds
force it elsewhere too, to measure that rule, and ``engine_fuses`` says which holds here. The
issue's network at a CFG batch (2 x 8 rows of 4 condition + 256 tokens):

    python benchmarks/perf/mlp.py --hidden 384 --depth 12 --heads 6 --batch 8 --latent 32 \
        --patch 2 --rounds 8 --json

``--batch`` is the number of images; the blocks run twice as many rows, as CFG does. One JSON
object goes to stdout with ``--json``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from unittest import mock

import torch

from cfkit import precision
from cfkit.perf.machine import log, machine
from cfkit.transformer import CausalTransformer, Mlp, TransformerConfig, fused_linear_gelu


def forced_fusion():
    """A context in which ``fused_linear_gelu`` takes this CPU for an AVX512 one."""
    return mock.patch.object(precision, "cpu_capability", lambda: "AVX512")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--hidden", 384), ("--depth", 12), ("--heads", 6), ("--batch", 8),
                          ("--latent", 32), ("--patch", 2)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (after one untimed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def run(args) -> dict:
    torch.manual_seed(args.seed)
    config = TransformerConfig(hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                               input_size=args.latent, patch_size=args.patch, latent_channels=4,
                               num_classes=1000)
    model = CausalTransformer(config.check()).eval()
    mlps = [module for module in model.modules() if isinstance(module, Mlp)]
    x = torch.randn(2 * args.batch, config.cond_len + config.num_tokens, args.hidden)
    with torch.no_grad():
        engine_fuses = fused_linear_gelu(x, mlps[0].fc1)
        with forced_fusion():
            if not fused_linear_gelu(x, mlps[0].fc1):
                raise SystemExit("this torch has no oneDNN (torch.backends.mkldnn): nothing to compare")
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds + 1):
        # each round in the other order: what one leaves behind (the allocator's free blocks,
        # the caches) falls on both alike
        for fused in ((True, False) if round_ % 2 else (False, True)):
            for mlp in mlps:
                mlp.fused = fused
            start = time.perf_counter()
            with torch.no_grad(), forced_fusion():
                for block in model.blocks:
                    block(x)
            elapsed = time.perf_counter() - start
            log(f"  {'fused' if fused else 'unfused'} round {round_ + 1}/{args.rounds + 1}"
                f"{' (warmup)' if round_ == 0 else ''}: {elapsed:.3f} s")
            if round_:
                times[fused].append(elapsed)
    ratios = [unfused / fused for fused, unfused in zip(times[True], times[False], strict=True)]
    return {**machine(), "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "engine_fuses": engine_fuses, "rows": tuple(x.shape),
            "fused_s": times[True], "unfused_s": times[False],
            "median_fused_s": statistics.median(times[True]),
            "median_unfused_s": statistics.median(times[False]),
            "speedup_by_round": ratios, "speedup": statistics.median(ratios)}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"fused {report['median_fused_s']:.4g} s, unfused {report['median_unfused_s']:.4g} s, "
              f"speed-up {report['speedup']:.3g}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
