"""The performance report: every benchmark of cfkit.perf, run as subprocesses, in one table.

    cfkit bench --perf [--size tiny|small|issue] [--out DIR]
    python benchmarks/perf/run_all.py [--size tiny|small|issue] [--out DIR] [--threads N] [--json]

Rows (one per measurement): the dense mask build (masks.py); the training step of
CausalFusion, In-context DiT and DiT in fp32 and bf16 against the reference-style baseline
(train_step.py); the cost per noised token of CausalFusion with K noised copies against
In-context DiT (train_step.py --copies K); sampling at several AR step counts S, KV-cached
against uncached and against the reference-style loop (sample.py), and on a CPU the blocks'
inference with the MLP's first layer and GELU fused against unfused (mlp.py); the benchmark model
(the size the comparative benchmarks train, fp32 on one thread) against the reference-style step,
with its time split and, at ``--size issue``, compiled against eager (train_step.py --compile);
the shard loader against the training step it feeds (data.py); the matmul peak of this machine
and the model FLOP utilisation against it (train_step.py --peak). ``--size issue`` is the issues' network
(D=384, depth 12, 6 heads, batch 8, 32x32 latents at patch 2); ``small`` (default) is the same
network on 16x16 latents, about 5 minutes on a 2-core CPU; ``tiny`` is the smoke size of the
tests, about 30 s. With CUDA, train_step.py and sample.py run on it. The K-copies and
sampling runs take the precision ``precision = "auto"`` takes on the device (bf16 on CUDA and
on a CPU where bf16 is native and faster than fp32, fp32 elsewhere), and issue 17's speed
targets are stated beside the rows in it.

``DIR/perf.json`` holds every sub-benchmark's JSON, the rows, the command lines and the
machine; ``DIR/perf.md`` the table and the commands. A failed sub-benchmark becomes a row with
its stderr tail, the others still run, and the exit status is 1. Progress goes to stderr.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import cfkit
from cfkit import precision
from cfkit.bench.stats import median_interval
from cfkit.perf.machine import log

# The sub-benchmarks' working folder: the one holding the cfkit package in use, first on the
# path of ``python -m``, so they import this very copy (a checkout, editable or installed).
PACKAGE_PARENT = Path(cfkit.__file__).resolve().parents[1]
STDERR_TAIL = 2000  # characters of a failed sub-benchmark's stderr kept in its row


@dataclass(frozen=True)
class Size:
    """How large and how long each sub-benchmark runs."""

    network: tuple[str, ...]  # train_step.py and sample.py flags: the model and the batch
    train_steps: int  # timed training steps (after ``train_warmup`` untimed rounds)
    bf16_steps: int  # the same in bf16, emulated (~100x slower than fp32) on CPUs without AMX
    copies: tuple[int, ...]  # K of the noised-token comparison (K = 1 comes with the fp32 run)
    ar_steps: tuple[int, ...]  # S of the sampling runs
    diffusion_steps: int  # timed diffusion steps per sampling variant and round (after one untimed)
    sample_rounds: int  # rounds of each sampling run: its variants in turn, ratios paired by round
    mlp_rounds: int  # timed rounds of the fused MLP against unfused (mlp.py)
    peak_size: int  # side of the square matmul of the peak
    # untimed rounds of each training-step run: the reference's step took three rounds to
    # settle at the size on a 2-core Xeon (11.2, 6.4, 5.8 s, then 3.8-5.1 s)
    train_warmup: int
    masks: tuple[str, ...]
    data: tuple[str, ...]
    bench_steps: int  # timed training steps of the benchmark model (BENCH_NETWORK)
    bench_warmup: int  # its untimed rounds: with bench_compile, the compiling falls in them
    bench_compile: bool  # also time it with train.compile = true (minutes of compiling)
    # OMP_NUM_THREADS of the sub-benchmarks (None: torch's choice). One thread on the shared
    # 2-core machine: with other jobs running, two OpenMP threads made a step up to 30x slower.
    threads: int | None
    timeout_s: float  # per sub-benchmark


SIZES = {
    "tiny": Size(
        network=("--hidden", "32", "--depth", "2", "--heads", "2", "--batch", "2",
                 "--latent", "8", "--patch", "2"),
        train_steps=1, bf16_steps=1, copies=(2,), ar_steps=(1, 4, 16), diffusion_steps=1, sample_rounds=1,
        mlp_rounds=1,
        peak_size=256, train_warmup=1, bench_steps=2, bench_warmup=1, bench_compile=False,
        masks=("--tokens", "256", "--cond", "16", "--steps", "1", "16", "256",
               "--repeats", "3", "--warmup", "1"),
        data=("--batch", "8", "--batches", "3", "--warmup", "1", "--repeats", "1",
              "--train-steps", "1", "--train-warmup", "1"),
        threads=1, timeout_s=120,
    ),
    "small": Size(
        network=("--hidden", "384", "--depth", "12", "--heads", "6", "--batch", "8",
                 "--latent", "16", "--patch", "2"),
        train_steps=3, bf16_steps=1, copies=(2, 4, 8), ar_steps=(1, 4, 16), diffusion_steps=3,
        sample_rounds=2, mlp_rounds=5, peak_size=1024, train_warmup=2, masks=(), data=(), threads=1,
        timeout_s=600,
        bench_steps=10, bench_warmup=3, bench_compile=False,
    ),
    "issue": Size(
        network=("--hidden", "384", "--depth", "12", "--heads", "6", "--batch", "8",
                 "--latent", "32", "--patch", "2"),
        # 9 paired rounds: the median's 95% interval between the 2nd and 8th (5 give only 94%
        # between the extremes, and one slow round on a shared machine then decides it); the
        # sampling's 3 rounds gave a 75% interval, 5 give 94%
        train_steps=9, bf16_steps=2, copies=(2, 4, 8), ar_steps=(1, 4, 16), diffusion_steps=3,
        sample_rounds=5, mlp_rounds=8, peak_size=2048, train_warmup=3, masks=(), data=(), threads=None,
        timeout_s=3600,
        bench_steps=30, bench_warmup=8, bench_compile=True,
    ),
}

# The benchmark model: the network the comparative benchmarks train many times
# (benchmarks/configs/digits-tiny.toml's size: 64 wide, 4 deep, 64 tokens, batch 32), fp32 on one
# CPU thread, as those runs train.
BENCH_NETWORK = ("--hidden", "64", "--depth", "4", "--heads", "4", "--batch", "32", "--latent", "8",
                 "--patch", "1")
BENCH_TARGET = 2.0  # issue 17: >= 2x the images/s of the engine when the issue was filed

Row = dict
# Table order: the benchmarks as the report lists them.
BENCHMARKS = ("mask build", "train step", "K copies", "sampling", "benchmark model", "time split", "loader",
              "matmul peak", "MFU")
Extract = Callable[[dict, dict[str, float]], list[Row]]


@dataclass(frozen=True)
class Job:
    """One sub-benchmark run and the rows its JSON gives."""

    benchmark: str
    setting: str
    name: str  # the module cfkit.perf.NAME, and the script benchmarks/perf/NAME.py that runs it
    args: tuple[str, ...]
    extract: tuple[Extract, ...] = ()
    threads: int | None = None  # OMP_NUM_THREADS of this run, whatever the report's

    def argv(self) -> list[str]:
        """The subprocess: the module of the installed package, run by this interpreter."""
        return [sys.executable, "-m", f"cfkit.perf.{self.name}", *self.args, "--json"]

    def command(self) -> str:
        """The same run as the report shows it: the script of a source checkout."""
        threads = f"OMP_NUM_THREADS={self.threads} " if self.threads is not None else ""
        return threads + shlex.join(["python", f"benchmarks/perf/{self.name}.py", *self.args, "--json"])

    def env(self, env: dict[str, str]) -> dict[str, str]:
        return env if self.threads is None else {**env, "OMP_NUM_THREADS": str(self.threads)}


def row(benchmark: str, setting: str, figure: str, value: float | None, unit: str, *,
        baseline: str | None = None, ratio: float | None = None, ratio_of: str | None = None,
        rounds: Sequence[float] | None = None, target: str | None = None, met: bool | None = None,
        threshold: float | None = None, error: str | None = None) -> Row:
    """One measurement. ``ratio`` compares ``value`` with ``baseline`` as ``ratio_of`` says;
    ``rounds``, the paired rounds' values whose median the checked figure is, give its 95%
    confidence interval (``median_interval``; lower coverage with 5 rounds or fewer, none with
    1). ``met`` says whether the figure meets ``target``, whose number is ``threshold``
    (``target_fields``); ``resolved`` whether the interval lies on one side of it (None without
    an interval or a threshold), so that a miss or a hit within the noise is said as such."""
    interval = median_interval(rounds) if rounds else None
    resolved = (None if interval is None or threshold is None
                else not interval.low < threshold < interval.high)
    return {"benchmark": benchmark, "setting": setting, "figure": figure, "value": value,
            "unit": unit, "baseline": baseline, "ratio": ratio, "ratio_of": ratio_of,
            "ratio_rounds": len(rounds) if rounds else None,
            "ratio_ci": None if interval is None else [interval.low, interval.high],
            "ratio_ci_level": None if interval is None else interval.level,
            "target": target, "met": met, "resolved": resolved, "error": error}


# --- rows of each sub-benchmark's JSON ----------------------------------------------------


def mask_rows(report: dict, peak: dict) -> list[Row]:
    target = f"<= {report['target_s'] * 1e3:g} ms"
    return [
        row("mask build", f"L={report['num_tokens']} C={report['cond_len']} S={s} "
            f"(T={r['sequence_length']})", "dense mask build, median", r["ours_s"] * 1e3, "ms",
            baseline=f"Python loop {r['baseline_s'] * 1e3:.3g} ms", ratio=r["baseline_over_ours"],
            ratio_of="baseline/value", target=target, met=r["meets_target"])
        for s, r in report["per_num_steps"].items()
    ]


def train_setting(entry: dict) -> str:
    return f"{entry['method']} {entry['dtype']}, T={entry['sequence_length']:g}"


def speed_target(report: dict) -> float | None:
    """Issue 17's speed-up over the reference for a CPU run in the precision ``auto`` takes
    there (the run's ``auto_precision``): >= 4x in bf16 (native and faster than fp32), >= 1.5x
    in fp32 (bf16 emulated, or native but slower, as the probe found); None otherwise."""
    if report.get("device") != "cpu" or report["dtype"] != report.get("auto_precision"):
        return None
    return {"bf16": 4.0, "fp32": 1.5}[report["dtype"]]


def target_fields(value: float | None, least: float | None = None, most: float | None = None,
                  name: str = "ratio") -> dict:
    """``target``, ``met`` and ``threshold`` (see ``row``) of a row whose ``name`` should be >=
    ``least`` or <= ``most``."""
    if least is None and most is None or value is None:
        return {}
    if least is not None:
        return {"target": f"{name} >= {least:g}", "met": value >= least, "threshold": least}
    return {"target": f"{name} <= {most:g}", "met": value <= most, "threshold": most}


def train_rows(report: dict, peak: dict) -> list[Row]:
    """The run's own method; causalfusion against the reference's eager fp32 step."""
    baseline = report.get("baseline")
    ratio = report.get("speedup_vs_reference")
    return [row("train step", train_setting(report), "step (fwd+bwd+AdamW+EMA), median",
                report["median_step_s"] * 1e3, "ms",
                baseline=baseline and f"reference eager fp32 {baseline['median_step_s'] * 1e3:.4g} ms",
                ratio=ratio, ratio_of=baseline and "baseline/value", rounds=report.get("speedup_by_round"),
                **target_fields(ratio, least=speed_target(report) if baseline else None))]


def incontext_rows(report: dict, peak: dict) -> list[Row]:
    """In-context DiT, timed in the same run (``--compare-incontext``)."""
    entry = report["incontext"]
    return [row("train step", train_setting(entry), "step (fwd+bwd+AdamW), median",
                entry["median_step_s"] * 1e3, "ms")]


def per_token_us(entry: dict) -> float:
    return entry["median_step_s"] / entry["noised_tokens_per_step"] * 1e6


def executed_per_token(entry: dict) -> float:
    """Matmul FLOPs the kernels execute per noised token (``flops_executed_per_step``), in MFLOP."""
    return entry["flops_executed_per_step"] / entry["noised_tokens_per_step"] / 1e6


def copies_rows(report: dict, peak: dict) -> list[Row]:
    """The time per noised token against In-context DiT's, and the executed matmul FLOPs per
    noised token against its: the ratio of work, which the time ratio equals where both steps
    reach the same FLOP rate (the K-copies step, with its longer sequences, can reach a higher
    one)."""
    incontext = report["incontext"]
    ratio = report["cost_per_noised_token_ratio"]
    setting = f"causalfusion K={report['copies']} {report['dtype']}"
    flops, flops_icdit = executed_per_token(report), executed_per_token(incontext)
    rounds = report["cost_ratio_by_round"]
    return [row("K copies", setting, "step time per noised token", per_token_us(report), "us",
                baseline=f"In-context DiT {per_token_us(incontext):.4g} us",
                ratio=ratio, ratio_of="value/baseline", rounds=rounds,
                **target_fields(ratio, most=1.15 if report["copies"] == 8 else None)),
            row("K copies", setting, "executed matmul FLOPs per noised token", flops, "MFLOP",
                baseline=f"In-context DiT {flops_icdit:.4g} MFLOP", ratio=flops / flops_icdit,
                ratio_of="value/baseline")]


def peak_rows(report: dict, peak: dict) -> list[Row]:
    size = report["settings"]["peak_size"]
    fp32, bf16 = report["peak_tflops_fp32"], report["peak_tflops_bf16"]
    return [
        row("matmul peak", f"fp32 {size}^3", "best of A@B, A@B^T", fp32, "TFLOP/s"),
        row("matmul peak", f"bf16 {report.get('peak_size_bf16', size)}^3", "best of A@B, A@B^T", bf16,
            "TFLOP/s",
            baseline=f"fp32 {fp32:.4g} TFLOP/s", ratio=bf16 / fp32, ratio_of="value/baseline"),
    ]


def mfu_rows(report: dict, peak: dict) -> list[Row]:
    """MFU of the run's method and of In-context DiT if timed: train_step.py's dense FLOP
    count (``flops_counted``) over the peak of this machine in that dtype."""
    entries = [report] + ([report["incontext"]] if "incontext" in report else [])
    bf16 = report.get("device") == "cpu" and report.get("auto_precision") == "bf16"
    rows = []
    for e in entries:
        mfu = e["tflops"] / peak[e["dtype"]] * 100
        target = {"target": ">= 55%", "met": mfu >= 55} if bf16 and e["dtype"] == "bf16" else {}
        rows.append(row("MFU", train_setting(e), "dense FLOPs / matmul peak", mfu, "%",
                        baseline=f"peak {peak[e['dtype']]:.4g} TFLOP/s", **target))
    return rows


def sample_rows(report: dict, peak: dict) -> list[Row]:
    setting = f"S={report['ar_steps']} {report['dtype']}, {report['step_tokens']} tokens per AR step"
    reference = report["reference"]
    cached_rounds, reference_rounds = report.get("cached_speedup_by_round"), report.get("speedup_by_round")
    return [
        row("sampling", setting, "diffusion step, KV-cached, median",
            report["median_step_s"] * 1e3, "ms",
            baseline=f"uncached {report['uncached']['median_step_s'] * 1e3:.4g} ms",
            ratio=report["cached_speedup"], ratio_of="baseline/value", rounds=cached_rounds,
            **target_fields(report["cached_speedup"], least=3.0 if report["ar_steps"] == 16 else None)),
        row("sampling", setting, "images/s, KV-cached", report["images_per_s"], "images/s",
            baseline=f"reference S=1 eager fp32 {reference['images_per_s']:.4g}",
            ratio=report["speedup_vs_reference"], ratio_of="value/baseline", rounds=reference_rounds,
            **target_fields(report["speedup_vs_reference"],
                            least=speed_target(report) if report["ar_steps"] == 1 else None)),
    ]


def mlp_rows(report: dict, peak: dict) -> list[Row]:
    """The blocks' CPU inference with the MLP's first layer and GELU fused, against unfused."""
    rows = "x".join(str(n) for n in report["rows"])
    used = "run here" if report.get("engine_fuses") else "run with AVX512 only"
    return [row("sampling", f"blocks forward, CPU inference, {rows}",
                f"MLP fc1 + GELU fused ({used}), median", report["median_fused_s"] * 1e3, "ms",
                baseline=f"unfused {report['median_unfused_s'] * 1e3:.4g} ms", ratio=report["speedup"],
                ratio_of="baseline/value", rounds=report["speedup_by_round"])]


def split_rows(setting: str, split: dict, benchmark: str = "time split") -> list[Row]:
    """A profiled step's time split (``cfkit.perf.breakdown``), in % of its operator time."""
    largest = ", ".join(f"{name.removeprefix('aten::')} {spent / split['total_s']:.0%}"
                        for name, spent in split["others"])
    figures = {"linear matmuls": "linear matmuls (mm, addmm, oneDNN linear + GELU)",
               "attention": "attention kernels (eager: bmm, softmax, masked_fill)",
               "everything else": f"everything else (largest: {largest})"}
    return [row(benchmark, setting, figure, split["shares"][kind] * 100, "% of operator time")
            for kind, figure in figures.items()]


def bound_row(setting: str, report: dict, target: float | None, benchmark: str = "time split") -> Row:
    """The speed-up over the reference if all but the engine's matmuls and attention took no
    time (``breakdown.speedup_bound``), beside the speed-up measured; against issue 17's
    ``target`` where one applies: a bound below it says that no cut of the overhead reaches
    the target, only faster matmuls or attention."""
    bound = report["speedup_bound_vs_reference"]
    share = report["profile"]["kernels_s"] / report["profile"]["wall_s"]
    # the rounds' speed-ups over the same share: the bound's interval, the share taken as known
    rounds = [speedup / share for speedup in report.get("speedup_by_round", ())]
    reachable = target_fields(bound, least=target, name="bound")
    if reachable:
        reachable["target"] += " (the speed-up target)"
    return row(benchmark, setting, "speed-up bound: all but matmuls and attention take no time",
               bound, "x",
               baseline=f"measured {report['speedup_vs_reference']:.3g}x / {share:.0%} of the "
                        "engine's step in matmuls and attention", rounds=rounds, **reachable)


def train_split_rows(report: dict, peak: dict) -> list[Row]:
    """The profiled round (``train_step.py --profile``) of the engine's step and the reference's."""
    baseline = report["baseline"]
    return [*split_rows(f"{train_setting(report)} train step", report["profile"]),
            *split_rows("reference eager fp32 train step", baseline["profile"]),
            bound_row(f"{train_setting(report)} train step", report, speed_target(report))]


def sample_split_rows(report: dict, peak: dict) -> list[Row]:
    """The profiled diffusion step (``sample.py --profile``) of the cached path and the reference's."""
    setting = f"S={report['ar_steps']} {report['dtype']} diffusion step"
    reference = report["reference"]
    return [*split_rows(setting, report["profile"]),
            *split_rows("reference S=1 eager fp32 diffusion step", reference["profile"]),
            bound_row(setting, report, speed_target(report) if report["ar_steps"] == 1 else None)]


def bench_setting(report: dict) -> str:
    s = report["settings"]
    tokens = (s["latent"] // s["patch"]) ** 2
    return (f"{report['method']} {report['dtype']}, D={s['hidden']} depth {s['depth']}, "
            f"{tokens} tokens (T={report['sequence_length']:g}), batch {s['batch']}, "
            f"{report['threads']} thread{'s' if report['threads'] > 1 else ''}")


def bench_rows(report: dict, peak: dict) -> list[Row]:
    """The benchmark model's training step (images/s) against the reference's, issue 17's target
    beside it (against the reference's step: see ``notes``); where timed, the step compiled
    (``train.compile = true``) against eager, its compiling (the warm-up rounds) in the baseline;
    the step's time split and its speed-up bound."""
    setting, baseline = bench_setting(report), report["baseline"]
    ratio, rounds = report["speedup_vs_reference"], report["speedup_by_round"]
    rows = [row("benchmark model", setting, "images/s, train step median", report["images_per_s"],
                "images/s", baseline=f"reference eager fp32 {baseline['images_per_s']:.4g} images/s",
                ratio=ratio, ratio_of="value/baseline", rounds=rounds,
                **target_fields(ratio, least=BENCH_TARGET))]
    if "compiled" in report:
        compiled = report["compiled"]
        compiling = sum(compiled["warmup_s"]) - sum(report["warmup_s"])
        rows.append(row("benchmark model", setting, "images/s with train.compile = true",
                        compiled["images_per_s"], "images/s",
                        baseline=f"eager {report['images_per_s']:.4g} images/s; compiling about "
                                 f"{compiling:.0f} s in the {len(compiled['warmup_s'])} warm-up steps",
                        ratio=report["compile_speedup"], ratio_of="value/baseline",
                        rounds=report["compile_speedup_by_round"]))
    return [*rows, *split_rows(f"{setting}, train step", report["profile"], "benchmark model"),
            bound_row(f"{setting}, train step", report, BENCH_TARGET, "benchmark model")]


def data_rows(report: dict, peak: dict) -> list[Row]:
    train = report["train"]["samples_per_s"]
    target = report["target_ratio"]
    return [
        row("loader", f"{kind}, batch {report['settings']['batch']}", "shard loader, median",
            report[f"loader_{kind}"]["samples_per_s"], "samples/s",
            baseline=f"training step {train:.4g} samples/s", ratio=report[f"ratio_{kind}"],
            ratio_of="value/baseline", target=f"ratio >= {target:g}",
            met=report[f"ratio_{kind}"] >= target)
        for kind in ("pixels", "latents")
    ]


# --- the plan -------------------------------------------------------------------------------


def native_bf16(device: str) -> bool:
    """Whether bf16 is native on ``device``: CUDA, or a CPU with AVX512-BF16 or AMX. Where it is
    not, the report runs no bf16 step (emulated, it would take hours)."""
    return device == "cuda" or bool(precision.native_bf16())


def training_precision(size: Size, device: str) -> precision.Precision:
    """What ``precision = "auto"`` takes on ``device`` for the size's network: the precision of
    the K-copies and sampling runs, and the one issue 17's targets apply to. A CPU whose flags
    show native bf16 can still run it slower than fp32 (the probe says so)."""
    width = int(size.network[size.network.index("--hidden") + 1])
    return precision.resolve("auto", device, width)


def plan(size: Size, device: str, fast: str) -> list[Job]:
    """Every sub-benchmark run of the report; ``fast`` is the precision ``auto`` takes here
    (``training_precision``), of the K-copies and sampling runs. The causalfusion fp32 run also
    times the matmul peak (for every MFU row); the run in ``fast`` gives the K = 1 row."""
    on_device = ("--device", device)
    native = native_bf16(device)
    train = (*size.network, *on_device, "--warmup", str(size.train_warmup))

    def steps(dtype: str) -> tuple[str, ...]:
        count = size.bf16_steps if dtype == "bf16" and device == "cpu" else size.train_steps
        return ("--dtype", dtype, "--steps", str(count))

    # where bf16 is emulated (about 100x slower than fp32) its steps would take hours at the
    # issue's size, and "auto" never trains in it there; where it is native both run
    dtypes = ("fp32", "bf16") if native else ("fp32",)
    jobs = []
    for dtype in dtypes:
        peak = ("--peak", "--peak-size", str(size.peak_size)) if dtype == "fp32" else ()
        profile = ("--profile",) if dtype == fast else ()  # the run issue 17's targets apply to
        extract = ((train_rows, incontext_rows, mfu_rows) + ((peak_rows,) if peak else ())
                   + ((copies_rows, train_split_rows) if dtype == fast else ()))
        jobs.append(Job("train step", f"causalfusion {dtype}", "train_step",
                        (*train, "--method", "causalfusion", *steps(dtype), "--compare-incontext",
                         *peak, *profile), extract))
    jobs += [Job("train step", f"dit {dtype}", "train_step",
                 (*train, "--method", "dit", *steps(dtype)), (train_rows, mfu_rows))
             for dtype in dtypes]
    jobs += [Job("K copies", f"causalfusion K={k} {fast}", "train_step",
                 (*train, "--method", "causalfusion", *steps(fast), "--copies", str(k),
                  "--no-baseline"), (copies_rows,))
             for k in size.copies]
    jobs += [Job("sampling", f"S={s} {fast}", "sample",
                 (*size.network, *on_device, "--dtype", fast, "--ar-steps", str(s),
                  "--steps", "250", "--cfg", "4", "--warmup", "1",
                  "--measure", str(size.diffusion_steps), "--rounds", str(size.sample_rounds),
                  *(("--profile",) if s == 1 else ())),
                 (sample_rows, *((sample_split_rows,) if s == 1 else ())))
             for s in size.ar_steps]
    if device == "cpu":  # the fused kernel is oneDNN's: CPU inference only
        jobs.append(Job("sampling", "MLP fused fp32", "mlp",
                        (*size.network, "--rounds", str(size.mlp_rounds)), (mlp_rows,)))
    # fp32 on one CPU thread whatever the device: how the comparative benchmarks train it
    jobs.append(Job("benchmark model", "causalfusion fp32", "train_step",
                    (*BENCH_NETWORK, "--device", "cpu", "--dtype", "fp32", "--steps", str(size.bench_steps),
                     "--warmup", str(size.bench_warmup), "--profile",
                     *(("--compile",) if size.bench_compile else ())), (bench_rows,), threads=1))
    jobs += [Job("mask build", "dense mask", "masks", size.masks, (mask_rows,)),
             Job("loader", "digits-tiny", "data", size.data, (data_rows,))]
    return jobs


# --- running --------------------------------------------------------------------------------


def run_job(job: Job, env: dict[str, str], timeout_s: float) -> dict:
    """Run one sub-benchmark: ``{"report": its JSON}`` or ``{"error": why}``, and its time."""
    start = time.perf_counter()
    try:
        done = subprocess.run(job.argv(), capture_output=True, text=True, env=env,
                              cwd=PACKAGE_PARENT, timeout=timeout_s)
    except subprocess.TimeoutExpired as timeout:
        stderr = timeout.stderr or b""  # bytes even with text=True
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        outcome = {"error": f"timed out after {timeout_s:g} s\n{stderr[-STDERR_TAIL:]}"}
    else:
        outcome = parse(done)
    outcome["wall_s"] = time.perf_counter() - start
    return outcome


def parse(done: subprocess.CompletedProcess) -> dict:
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode}\n{done.stderr[-STDERR_TAIL:]}"}
    try:
        return {"report": json.loads(done.stdout)}
    except json.JSONDecodeError as error:
        return {"error": f"no JSON on stdout ({error})\n{done.stderr[-STDERR_TAIL:]}"}


def job_rows(job: Job, outcome: dict, peak: dict[str, float]) -> list[Row]:
    """The job's rows; a failed run, or a figure missing from its JSON (or a peak missing for
    the MFU), becomes a row carrying the failure."""
    if "report" not in outcome:
        return [row(job.benchmark, job.setting, "failed", None, "", error=outcome["error"])]
    rows = []
    for extract in job.extract:
        try:
            rows += extract(outcome["report"], peak)
        except (KeyError, TypeError, ZeroDivisionError) as error:
            rows.append(row(job.benchmark, job.setting, f"failed: {extract.__name__}", None, "",
                            error=f"{type(error).__name__}: {error} missing"))
    return rows


def measured_peak(outcomes: list[dict]) -> dict[str, float]:
    """``{dtype: TFLOP/s}`` from the run that timed the matmul peak; empty if it failed."""
    for outcome in outcomes:
        report = outcome.get("report", {})
        if "peak_tflops_fp32" in report:
            return {"fp32": report["peak_tflops_fp32"], "bf16": report["peak_tflops_bf16"]}
    return {}


def machine(device: str) -> dict:
    return {
        "cpu": precision.cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": precision.cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }


# --- writing --------------------------------------------------------------------------------


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"  # no 3.2e+04
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(perf: dict) -> str:
    """The table of ``perf["rows"]`` with the setting, the notes and the commands."""
    head = ["benchmark", "setting", "figure", "value", "unit", "baseline", "ratio", "target",
            "met"]
    lines = [f"# Performance report ({perf['size']}, {perf['device']})", "",
             *perf["notes"], "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in perf["rows"]:
        pieces = [f"{r['ratio']:.4g} ({r['ratio_of']})"] if r["ratio"] is not None else []
        if r.get("ratio_ci"):  # a bound row's interval is its value's: it has no ratio
            (low, high), level = r["ratio_ci"], r["ratio_ci_level"]
            pieces.append(f"{level:.0%} CI {low:.3g}-{high:.3g} over {r['ratio_rounds']} rounds")
        ratio = "; ".join(pieces)
        met = r["met"]
        if met is not None and r.get("resolved") is False:
            met = f"{cell(met)} (the CI spans the target: not resolvable)"
        value = cell(r["value"]) if r["error"] is None else f"FAILED: {cell(r['error'])[:300]}"
        cells = [r["benchmark"], r["setting"], r["figure"], value, r["unit"], r["baseline"],
                 ratio, r["target"], met]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    threads = perf["omp_num_threads"]
    lines += ["", "Commands (run from the repository root"
              + (f", with OMP_NUM_THREADS={threads}" if threads else "") + "):", "", "```"]
    lines += [job["command"] for job in perf["jobs"]]
    return "\n".join([*lines, "```", ""])


def notes(perf: dict) -> list[str]:
    m = perf["machine"]
    lines = [f"{m['cpu']}, {m['cpu_count']} cores ({m['cpu_capability']}), torch {m['torch']}, "
             f"CUDA {'available: ' + m['gpu'] if m['gpu'] else 'not available'}.",
             f"Network flags: `{' '.join(perf['network'])}`; sub-benchmark threads: "
             f"{perf['omp_num_threads'] or 'torch default'}; total {perf['wall_s']:.0f} s."]
    peak = measured_peak(perf["jobs"])
    if peak:
        ratio = peak["bf16"] / peak["fp32"]
        emulated = not perf["native_bf16"]
        lines.append(f"Measured bf16/fp32 matmul throughput ratio: {ratio:.3g}"
                     + (f"; bf16 is emulated on this CPU ({m['cpu_capability']}, no AVX512-BF16 or "
                        "AMX): the bf16 training steps are not run" if emulated else "") + ".")
    auto = perf["auto_precision"]
    lines.append(f"`precision = \"auto\"` takes {auto['precision_used']} here "
                 f"({auto['precision_reason']}): the K-copies and sampling rows run in it, and "
                 "issue 17's speed targets apply to the rows in it.")
    over = [r["setting"] for r in perf["rows"] if r["benchmark"] == "MFU" and (r["value"] or 0) > 100]
    if over:
        lines.append(f"MFU over 100% ({', '.join(over)}): the steps ran faster than the matmul peak "
                     "timed before and after them, so the machine's speed changed during the run "
                     "and the MFU rows are not to be trusted.")
    loads = [perf["load_average_start"][0], perf["load_average_end"][0]]
    if max(loads) > 1:
        lines.append(f"The machine was shared: 1-minute load average {loads[0]:.2f} at the start, "
                     f"{loads[1]:.2f} at the end (> 1), so timings may be pessimistic.")
    if any(r["benchmark"] == "benchmark model" for r in perf["rows"]):
        lines.append(f"The benchmark model's target (issue 17: >= {BENCH_TARGET:g}x the images/s cfkit "
                     "trained it at when the issue was filed) is checked against the reference-style "
                     "step, the baseline this tree can time; cfkit then was already faster than that "
                     "step, so a met target there would still need checking against cfkit then.")
    lines.append("ratio: `baseline/value` > 1 means faster than the baseline, `value/baseline` is "
                 "the value relative to the baseline. A row's baseline is timed in the same "
                 "sub-benchmark run. Where the run paired its rounds (one of each in turn), the "
                 "ratio is the median of the rounds' ratios and the CI a distribution-free "
                 "interval of that median (order statistics: 95%, or the full range's lower "
                 "coverage with 5 rounds or fewer); a target whose CI spans it is not resolvable "
                 "by that run.")
    return [f"- {line}" for line in lines]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder and rename it over ``path``."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # a temp file is private; the report is not
    os.replace(handle.name, path)


# --- entry point ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--out", type=Path,
                   help="output folder (default: benchmarks/results/perf-SIZE-DEVICE in the current "
                        "folder)")
    p.add_argument("--threads", type=int,
                   help="OMP_NUM_THREADS of the sub-benchmarks, 0 = torch's choice (default: "
                        "the size's: 1 for tiny and small, torch's for issue)")
    p.add_argument("--json", action="store_true", help="print perf.json on stdout")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    size = SIZES[args.size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or Path("benchmarks") / "results" / f"perf-{args.size}-{device}"
    threads = size.threads if args.threads is None else args.threads or None
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    chosen = training_precision(size, device)
    jobs = plan(size, device, chosen.name)
    perf = {"size": args.size, "device": device, "machine": machine(device),
            "network": list(size.network), "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "python_executable": sys.executable, "load_average_start": list(os.getloadavg()),
            "native_bf16": native_bf16(device), "auto_precision": chosen.record()}
    start = time.perf_counter()
    outcomes = []
    for number, job in enumerate(jobs, 1):
        log(f"[{number}/{len(jobs)}] {job.command()}")
        outcomes.append(run_job(job, job.env(env), size.timeout_s))
        status = "FAILED" if "error" in outcomes[-1] else "ok"
        log(f"  {status} in {outcomes[-1]['wall_s']:.1f} s")
    peak = measured_peak(outcomes)
    rows = sorted((r for job, outcome in zip(jobs, outcomes, strict=True)
                   for r in job_rows(job, outcome, peak)),
                  key=lambda r: BENCHMARKS.index(r["benchmark"]))
    perf.update(
        wall_s=time.perf_counter() - start,
        load_average_end=list(os.getloadavg()),
        jobs=[{"benchmark": job.benchmark, "setting": job.setting, "command": job.command(),
               "argv": job.argv(), **outcome} for job, outcome in zip(jobs, outcomes, strict=True)],
        rows=rows,
    )
    perf["notes"] = notes(perf)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(perf, indent=1)
    write_atomic(out / "perf.json", text + "\n")
    write_atomic(out / "perf.md", markdown(perf))
    failed = [r for r in rows if r["error"] is not None]
    log(f"wrote {out / 'perf.md'} and perf.json in {perf['wall_s']:.0f} s"
        + (f"; {len(failed)} FAILED" if failed else ""))
    if args.json:
        print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
