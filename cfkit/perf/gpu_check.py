"""The CUDA paths in one run, for a machine with a GPU: FlexAttention (compiled) against sdpa in
bf16, the training step and its MFU, sampling, ``train.compile``, and a one-process NCCL group.

    python benchmarks/perf/gpu_check.py --out benchmarks/results/gpu-check.json

Each check is a JSON entry ``{"ok": bool, ...figures}``; a failed check records its error and
the others still run (exit status 1 if any failed). ``--device cpu --size tiny`` runs the same
checks on the CPU (fp32 agreement, no NCCL), as the tests do. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from cfkit.checkpoint import atomic_write
from cfkit.perf import sample, train_step
from cfkit.perf.machine import log, machine

SIZES = {  # the network, and a smoke size
    "issue": ["--hidden", "384", "--depth", "12", "--heads", "6", "--batch", "8", "--latent", "32",
              "--patch", "2"],
    "tiny": ["--hidden", "32", "--depth", "2", "--heads", "2", "--batch", "2", "--latent", "8",
             "--patch", "2"],
}


def attention_agreement(args) -> dict:
    """The CausalFusion network's per-token loss and input gradient with flex (compiled on
    CUDA) and with sdpa, same weights and plan: max differences relative to their scales. On
    the CPU, whose FlexAttention has no backward, the forward only."""
    precision = "bf16" if args.device == "cuda" else "fp32"
    outputs = {}
    for backend in ("flex", "sdpa"):
        torch.manual_seed(0)
        options = train_step.parser().parse_args([*SIZES[args.size], "--attention", backend])
        method = train_step.experiment(options, "causalfusion", 2, backend).build_method()
        with torch.no_grad():  # the zero-initialised output layer would hide the attention
            for p in method.model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        method.model.to(args.device)
        batch = train_step.batch_of(options, torch.device(args.device))
        backward = args.device == "cuda"
        batch.latents.requires_grad_(backward)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=precision == "bf16"), \
                torch.set_grad_enabled(backward):
            out = method.loss(batch, torch.Generator().manual_seed(0))
        outputs[backend] = [out.per_token.detach().float()]
        if backward:
            out.loss.backward()
            outputs[backend].append(batch.latents.grad.float())
    errors = [((f - s).abs().max() / s.abs().max()).item() for f, s in zip(*outputs.values(), strict=True)]
    tolerance = 2e-2 if precision == "bf16" else 1e-4
    return {"ok": max(errors) < tolerance, "precision": precision,
            "relative_error_loss_per_token": errors[0],
            "relative_error_input_grad": errors[1] if len(errors) > 1 else None, "tolerance": tolerance}


def training_step(args) -> dict:
    """train_step.py's figures: the engine's step against the reference's, with the peak."""
    dtype = "bf16" if args.device == "cuda" else "fp32"
    options = train_step.parser().parse_args(
        [*SIZES[args.size], "--device", args.device, "--dtype", dtype, "--steps", str(args.steps),
         "--warmup", "2", "--peak", "--peak-size", "4096" if args.device == "cuda" else "256",
         "--compare-incontext"])
    report = train_step.run(options)
    return {"ok": True, **{k: report[k] for k in ("median_step_s", "speedup_vs_reference", "tflops",
                                                    "mfu", "cost_per_noised_token_ratio", "precision")}}


def sampling(args) -> dict:
    """sample.py's figures at S = 1 and S = 16 (CFG 4)."""
    dtype = "bf16" if args.device == "cuda" else "fp32"
    figures = {}
    for ar_steps in (1, 16):
        options = sample.parser().parse_args(
            [*SIZES[args.size], "--device", args.device, "--dtype", dtype, "--ar-steps", str(ar_steps),
             "--steps", "250", "--cfg", "4", "--warmup", "1", "--measure", str(args.steps)])
        report = sample.run(options)
        figures[f"S={ar_steps}"] = {k: report[k] for k in ("median_step_s", "images_per_s",
                                                          "cached_speedup", "speedup_vs_reference")}
    return {"ok": True, **figures}


def compiled_training(args, folder: Path) -> dict:
    """``train.compile = true``: the compiled step's losses against the eager step's."""
    from cfkit.train import Trainer

    options = train_step.parser().parse_args(SIZES[args.size])
    device = torch.device(args.device)
    losses, seconds = {}, {}
    for compiled in (False, True):
        experiment = train_step.experiment(options, "causalfusion", 1, None,
                                           "bf16" if args.device == "cuda" else "fp32")
        experiment = experiment.model_copy(
            update={"train": experiment.train.model_copy(update={"compile": compiled})})
        torch.manual_seed(0)
        trainer = Trainer(experiment, folder / f"compile-{compiled}")
        batch = train_step.batch_of(options, device)
        start = time.perf_counter()
        losses[compiled] = [trainer.train_step([batch])[0] for _ in range(args.steps)]
        seconds[compiled] = time.perf_counter() - start
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False], strict=True))
    return {"ok": gap < 5e-2, "losses_eager": losses[False], "losses_compiled": losses[True],
            "max_relative_loss_gap": gap, "seconds_eager": seconds[False],
            "seconds_compiled_with_compilation": seconds[True]}


def nccl_group(args) -> dict:
    """A one-process NCCL group: all-reduce and barrier on this GPU."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        value = torch.ones(4, device="cuda")
        dist.all_reduce(value)
        dist.barrier()
        return {"ok": bool((value == 1).all()), "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))}
    finally:
        dist.destroy_process_group()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default="issue", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=5, help="timed steps of each timing")
    p.add_argument("--out", type=Path, help="write the JSON here too (atomically)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; allowed: run it where there is one, or "
                         "--device cpu (the same checks on the CPU)")
    checks = {"attention agreement": attention_agreement, "training step": training_step,
              "sampling": sampling, "compiled training": compiled_training}
    if args.device == "cuda":
        checks["nccl"] = nccl_group
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              **machine(), "size": args.size, "checks": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, check in checks.items():
            log(f"gpu_check: {name}")
            try:
                extra = (Path(folder),) if check is compiled_training else ()
                report["checks"][name] = check(args, *extra)
            except Exception as error:  # one failed check must not lose the others' figures
                report["checks"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                                          "traceback": traceback.format_exc()[-3000:]}
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
