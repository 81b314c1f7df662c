"""Time building the dense generalised causal mask (cfkit.masks.generalized_causal_mask).

L = 1024 tokens, 64 condition tokens, S in {1, 64, 1024} AR steps of sizes as equal as
possible (the ``fixed`` schedule). The reference-style baseline, measured in the same run, is
a Python-loop construction in the way the official ``get_attn_mask`` builds it: start from
"everything masked" (torch.ones, 1 = may NOT attend) and unmask slices step by step. Both
constructions are checked to agree before anything is timed.

    python benchmarks/perf/masks.py --json

One JSON object goes to stdout with ``--json``; the target is 20 ms per mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import cfkit
from cfkit.masks import generalized_causal_mask

TARGET_S = 0.02


def baseline_mask(cond_len: int, step_sizes: list[int]) -> torch.Tensor:
    """``(T, T)`` with 1 = may NOT attend, built slice by slice in a Python loop over steps.

    Layout ``[cond | clean tokens of steps 1..S-1 | noisy tokens of steps 1..S]``.
    """
    num_tokens = sum(step_sizes)
    clean_len = num_tokens - step_sizes[-1]
    length = cond_len + clean_len + num_tokens
    clean, noisy = cond_len, cond_len + clean_len  # where each block starts
    mask = torch.ones(length, length)
    mask[:, :cond_len] = 0  # every token sees the condition
    start = 0
    for size in step_sizes:
        end = start + size
        if end <= clean_len:  # clean tokens of this step: clean tokens of steps <= s
            mask[clean + start : clean + end, clean : clean + end] = 0
        # noisy tokens of this step: clean tokens of earlier steps, noisy tokens of this step
        mask[noisy + start : noisy + end, clean : clean + start] = 0
        mask[noisy + start : noisy + end, noisy + start : noisy + end] = 0
        start = end
    return mask


def median_seconds(build, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        build()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(num_tokens: int, cond_len: int, num_steps: int, repeats: int, warmup: int) -> dict:
    sizes = cfkit.build("schedules", "fixed", steps=num_steps)(num_tokens).tolist()
    ours = generalized_causal_mask(cond_len, sizes)
    assert torch.equal(ours, baseline_mask(cond_len, sizes) == 0), f"masks differ at S={num_steps}"
    ours_s = median_seconds(lambda: generalized_causal_mask(cond_len, sizes), repeats, warmup)
    baseline_s = median_seconds(lambda: baseline_mask(cond_len, sizes), repeats, warmup)
    return {
        "sequence_length": ours.shape[0],
        "ours_s": ours_s,
        "baseline_s": baseline_s,
        "baseline_over_ours": baseline_s / ours_s,
        "meets_target": ours_s <= TARGET_S,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="L")
    parser.add_argument("--cond", type=int, default=64, help="condition tokens C")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 64, 1024], help="S values")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    results = {
        str(s): measure(args.tokens, args.cond, s, args.repeats, args.warmup) for s in args.steps
    }
    report = {
        "what": "dense generalised causal mask (T, T) bool; median seconds per build",
        "num_tokens": args.tokens,
        "cond_len": args.cond,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "target_s": TARGET_S,
        "per_num_steps": results,
        "meets_target": all(r["meets_target"] for r in results.values()),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"L={args.tokens} C={args.cond}, median of {args.repeats} (target {TARGET_S * 1e3:.0f} ms)")
    for s, r in results.items():
        print(f"S={s:>5} T={r['sequence_length']:>5}  ours {r['ours_s'] * 1e3:7.2f} ms  "
              f"baseline {r['baseline_s'] * 1e3:7.2f} ms  x{r['baseline_over_ours']:.2f}  "
              f"{'ok' if r['meets_target'] else 'MISSES TARGET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
