"""The benchmark model's training step with only its blocks compiled, against eager, paired.

    OMP_NUM_THREADS=1 python benchmarks/results/perf-issue17-avx2-cpu/s11/compile-blocks.py

Two engine steps of the same seed (so each round's two steps draw the same plan): one eager,
one whose 4 blocks are ``torch.compile(block, dynamic=True)`` (one graph for every sequence
length; the plan and mask stay eager). 8 untimed rounds (the compiling), then 30 timed ones;
prints the warm-up time and the median and quartiles of eager / compiled step time.
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from cfkit.perf.train_step import EngineStep, parser

NETWORK = "--hidden 64 --depth 4 --heads 4 --batch 32 --latent 8 --patch 1 --device cpu --dtype fp32"


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    args = parser().parse_args(NETWORK.split())
    cpu = torch.device("cpu")
    eager = EngineStep(args, "causalfusion", 1, None, "fp32", cpu, Path(tempfile.mkdtemp()))
    compiled = EngineStep(args, "causalfusion", 1, None, "fp32", cpu, Path(tempfile.mkdtemp()))
    for block in compiled.model.blocks:
        block.compile(dynamic=True)
    start = time.perf_counter()
    for _ in range(8):
        compiled()
        eager()
    print("warm-up", time.perf_counter() - start, "s", flush=True)
    ratios = sorted(timed(eager) / timed(compiled) for _ in range(30))
    print("eager/compiled median", statistics.median(ratios), "quartiles", ratios[7], ratios[22])


if __name__ == "__main__":
    main()
