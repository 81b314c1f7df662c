"""Time the transformer blocks with the engine's MLP (``Mlp.fused``) against the reference's
two kernels (a linear layer, then torch's tanh GELU), their rounds interleaved so that other
load on the machine falls on both alike; the speed-up is the median of the rounds' ratios. By
default the blocks' forward in CPU inference (a sampling step's network work) with the MLP's
first layer and GELU as one oneDNN kernel, which the engine runs where the CPU has AVX512 (the
rounds force it elsewhere, to measure that rule; ``engine_fuses`` says which); with ``--training`` their
forward and backward in fp32, as a training step runs them, where the engine computes the GELU
in its sigmoid form (``SigmoidFormGelu``). The issue's network at a CFG batch (2 x 8 rows of 4
condition + 256 tokens):

    python benchmarks/perf/mlp.py --hidden 384 --depth 12 --heads 6 --batch 8 --latent 32 \
        --patch 2 --rounds 8 [--training] --json

``--batch`` is the number of images; in inference the blocks run twice as many rows, as CFG
does, in training ``--batch`` rows. One JSON object goes to stdout with ``--json``; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from unittest import mock

import torch

from cfkit import transformer
from cfkit.perf.machine import log, machine
from cfkit.transformer import (
    CausalTransformer,
    Mlp,
    TransformerConfig,
    fused_linear_gelu,
    sigmoid_form_applies,
)


def forced_fusion():
    """A context in which ``fused_linear_gelu`` takes this CPU for AVX512: the inference rounds
    time the fused kernel on every CPU, to measure the rule that runs it only there."""
    return mock.patch.object(transformer, "cpu_capability", lambda: "AVX512")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--hidden", 384), ("--depth", 12), ("--heads", 6), ("--batch", 8),
                          ("--latent", 32), ("--patch", 2)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (after one untimed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--training", action="store_true",
                   help="forward and backward in fp32 (the GELU's sigmoid form), not inference")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def run(args) -> dict:
    torch.manual_seed(args.seed)
    config = TransformerConfig(hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                               input_size=args.latent, patch_size=args.patch, latent_channels=4,
                               num_classes=1000)
    model = CausalTransformer(config.check()).train(args.training)
    mlps = [module for module in model.modules() if isinstance(module, Mlp)]
    rows = (1 if args.training else 2) * args.batch  # inference: a CFG batch, twice the images
    x = torch.randn(rows, config.cond_len + config.num_tokens, args.hidden)
    if args.training:
        grad = torch.randn_like(x)
        if not sigmoid_form_applies(x):
            raise SystemExit("the GELU's sigmoid form runs in fp32 on the CPU only: nothing to compare")
    else:
        with torch.no_grad():
            engine_fuses = fused_linear_gelu(x, mlps[0].fc1)
            with forced_fusion():
                if not fused_linear_gelu(x, mlps[0].fc1):
                    raise SystemExit("this torch has no oneDNN (torch.backends.mkldnn): nothing to compare")

    def blocks() -> None:
        if args.training:
            out = x
            for block in model.blocks:
                out = block(out)
            out.backward(grad)
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), forced_fusion():
                for block in model.blocks:
                    block(x)

    names = {True: "sigmoid-form GELU" if args.training else "fused",
             False: "torch's GELU" if args.training else "unfused"}
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds + 1):
        for fused in (True, False):
            for mlp in mlps:
                mlp.fused = fused
            start = time.perf_counter()
            blocks()
            elapsed = time.perf_counter() - start
            log(f"  {names[fused]} round {round_ + 1}/{args.rounds + 1}"
                f"{' (warmup)' if round_ == 0 else ''}: {elapsed:.3f} s")
            if round_:
                times[fused].append(elapsed)
    ratios = [unfused / fused for fused, unfused in zip(times[True], times[False], strict=True)]
    return {**machine(), "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "mode": "training" if args.training else "inference",
            # inference: whether the engine runs the fused kernel on this CPU (AVX512 only)
            "engine_fuses": None if args.training else engine_fuses,
            # fused_s: the engine's MLP (Mlp.fused: one oneDNN kernel in inference, the GELU's
            # sigmoid form in training); unfused_s: the reference's two kernels
            "rows": tuple(x.shape), "fused_s": times[True], "unfused_s": times[False],
            "median_fused_s": statistics.median(times[True]),
            "median_unfused_s": statistics.median(times[False]),
            "speedup_by_round": ratios, "speedup": statistics.median(ratios)}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['mode']}: engine's MLP {report['median_fused_s']:.4g} s, reference's "
              f"{report['median_unfused_s']:.4g} s, "
              f"speed-up {report['speedup']:.3g}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
