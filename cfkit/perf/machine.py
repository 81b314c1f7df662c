"""What every perf report states about the machine it was measured on, and the network
arguments the training-step and sampling benchmarks share."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from cfkit import precision


def log(message: str) -> None:
    """A benchmark's progress line, on stderr (stdout holds its JSON)."""
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously), so that a timer reads it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> dict:
    """torch version, the CPU and its capability (torch's SIMD level, native bf16 flags),
    intra-op threads, CPU count and the load average at the start (other work on the machine
    skews timings)."""
    return {"torch": torch.__version__, "cpu": precision.cpu_model(),
            "cpu_capability": precision.cpu_capability(),
            "cpu_native_bf16": precision.native_bf16(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg()}


def auto_precision(device: torch.device | str, width: int) -> dict:
    """What ``precision = "auto"`` takes on ``device`` for a network ``width`` wide, and why
    (on a CPU: its bf16 flags and the probe; ``CFKIT_PRECISION`` where set): the precision
    whose figures issue 17's targets apply to."""
    chosen = precision.resolve("auto", device, width)
    return {"auto_precision": chosen.name, "auto_precision_reason": chosen.reason}


def network_parser(description: str, dtypes) -> argparse.ArgumentParser:
    """A benchmark's parser with the measured network and batch: method, width, depth, heads,
    batch, latent grid side, patch, precision (one of ``dtypes``) and attention backend."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--method", default="causalfusion", help="a registered method name")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent grid side")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--dtype", choices=list(dtypes), default="bf16")
    p.add_argument("--attention", default=None, help="attention backend (the method's default)")
    return p


def model_options(args, attention: str | None) -> dict:
    """The ``[model]`` table of those arguments: 4 latent channels, 1000 classes."""
    model = {
        "hidden_size": args.hidden, "depth": args.depth, "num_heads": args.heads,
        "input_size": args.latent, "patch_size": args.patch, "latent_channels": 4,
        "num_classes": 1000,
    }
    return model if attention is None else {**model, "attention": attention}
