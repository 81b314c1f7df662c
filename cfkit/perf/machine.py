"""What every perf report states about the machine it was measured on."""

from __future__ import annotations

import os

import torch


def machine() -> dict:
    """torch version, intra-op threads, CPU count and the load average at the start (other
    work on the machine skews timings)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}
