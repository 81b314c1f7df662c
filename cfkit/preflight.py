"""Checks of what a command needs from its environment, made before it does any work: the
device exists and the output folder can be written. An OSError that still happens (a full
disk) becomes one line naming the file and what to do.

``--device auto`` (every command's default) is CUDA when this machine has it, else the CPU; on
CUDA, float32 matmuls and convolutions run on TF32 tensor cores, as DiT and MAR train and
sample."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import tempfile
from pathlib import Path

import torch

AUTO = "auto"  # the --device default: CUDA when present, else the CPU
# commands whose --out is a file to write, not a folder
FILE_OUTPUTS = ("tokenizer",)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "give a writable path",
    errno.EACCES: "give a path this user can use",
    errno.EPERM: "give a path this user can use",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def check(args) -> None:
    """A ValueError naming the option when the device or an output of a parsed command line
    (``cfkit eval`` writes into the evaluated folder without --out) cannot be used. The
    ``--device`` is resolved in ``args`` (``auto`` to this machine's) and, when CUDA, TF32 is on."""
    if getattr(args, "device", None) is not None:
        chosen = device(args.device)
        args.device = str(chosen)
        enable_tf32(chosen)
    out = getattr(args, "out", None)
    if out is not None:
        (writable_file if args.command in FILE_OUTPUTS else writable_folder)(out, f"--out {out}")
    elif args.command == "eval":
        writable_folder(args.checkpoint, f"{args.checkpoint} (where eval writes without --out)")
    if getattr(args, "save_stats", False):
        writable_file(args.path_b, f"PATH_B {args.path_b}")


def keep_freed_memory() -> None:
    """On Linux with glibc, freed blocks of up to 1 GiB stay in the process's heap for reuse
    instead of going back to the system. A training or sampling step allocates activations of
    the same sizes at every step; glibc maps those over 32 MiB afresh each time, and the kernel
    faults in and zeroes every page of them again (the K = 8 CausalFusion step of the issue's
    network at depth 3 on a 2-core AVX2 EPYC: 1.2x faster, in
    ``benchmarks/results/perf-issue17-avx2-cpu/alloc-k8-depth3.json``). ``CFKIT_MALLOC=system``
    keeps glibc's defaults; on other platforms and C libraries nothing changes."""
    if os.environ.get("CFKIT_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_MMAP_THRESHOLD, 1 << 30)  # blocks up to 1 GiB from the heap, not fresh mappings
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and up to 1 GiB of freed heap kept, not given back


def devices() -> list[str]:
    """The devices of this machine that torch can use."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def device(text: str) -> torch.device:
    """``torch.device(text)`` when this machine has it (``auto``: CUDA when present, else the
    CPU), else a ValueError listing those it has."""
    if text == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = ", ".join([*devices(), AUTO])
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device name; allowed here: {allowed}") from None
    if chosen.type == "cpu" or str(chosen) in devices():
        return chosen
    why = {"cuda": "CUDA is not available (no GPU, or a CPU-only torch)" if not torch.cuda.is_available()
           else f"this machine has {torch.cuda.device_count()} CUDA device(s)",
           "mps": "MPS is not available"}.get(chosen.type, f"{chosen.type} devices are not supported")
    raise ValueError(f"--device {text}: {why}; allowed here: {allowed}")


def enable_tf32(chosen: torch.device) -> None:
    """On a CUDA device, float32 matmuls (cuBLAS) and convolutions (cuDNN) on TF32 tensor cores:
    about 8x the float32 throughput on Ampere and later at a 10-bit mantissa in the products,
    which training and sampling diffusion models tolerate. No change on other devices."""
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def writable_folder(path, what: str) -> None:
    """A ValueError saying ``what`` (e.g. "--out runs/a") is wrong unless ``path`` is a folder
    (or can be made one) this process can write in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} is a file; give a folder (made when missing)")
    _writable(path, what)


def writable_file(path, what: str) -> None:
    """A ValueError saying ``what`` is wrong unless ``path`` is a file this process can write
    (its folder may be made)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} is a folder; give a file to write")
    _writable(path.parent, what)


def _writable(folder: Path, what: str) -> None:
    """Write and remove a probe file in ``folder``, or in its nearest existing parent (which
    then makes the folder)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, so no folder can be made there; give a "
                         "path under a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".cfkit-probe-"):
            pass
    except OSError as error:
        raise ValueError(f"{what}: cannot write in {existing} ({error.strerror}); give a writable "
                         "folder") from None


def describe(error: OSError) -> str:
    """One line for an OSError: the file, what went wrong and, when known, what to do."""
    what = error.strerror or str(error)
    where = f"{error.filename}: " if error.filename else ""
    hint = HINTS.get(error.errno)
    return f"{where}{what}" + (f"; {hint}" if hint else "")
