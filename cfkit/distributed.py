"""The process group: torchrun's processes (DDP / FSDP) or a single process.

Every process of a torchrun reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; rank 0 is the
main process, which alone writes the files that all processes share.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from cfkit.preflight import enable_tf32


def barrier():
    """Wait for every process of the group (nothing to wait for in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Distributed:
    """The process group from torchrun's environment (or a single process), on this process's
    GPU when there are GPUs (TF32 on), else on the CPU."""

    def __init__(self, timeout: datetime.timedelta | None = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        enable_tf32(self.device)
        # a group made by a caller (cfkit bench around its runs) outlives this object
        self.owned = self.world_size > 1 and not dist.is_initialized()
        if self.owned:
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def from_main(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every process (what the others pass is ignored)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def gather(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Every process's ``rows`` ``(n_r, ...)`` concatenated in rank order, on the CPU of
        rank 0 (None on the others). ``n_r`` may differ between processes (0 too); the other
        dimensions and the dtype must not."""
        if self.world_size == 1:
            return rows.cpu()
        count = torch.tensor([len(rows)], device=self.device)
        counts = [torch.empty_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        counts = [int(c) for c in counts]
        # all_gather takes equal shapes: every process sends the largest count, padded
        padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=self.device)
        padded[:len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        if not self.is_main:
            return None
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)]).cpu()

    def close(self):
        """Leave the group, if this object made it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
