"""One process at a time in an output folder (a run, a bench, an evaluation).

``hold(folder)`` takes an exclusive ``flock`` on ``folder/.cfkit.lock`` and writes its pid
into the file. The kernel drops an flock when its process dies, so the lock of a killed
process is free for the next one; the pid it left behind says that it was taken over.
Under torchrun only rank 0 takes it (the other ranks write nothing of their own). A process
may hold a folder more than once (``cfkit train`` and the trainer it runs); a forked child
(a data loader worker) closes its copy, so the lock ends with the process that took it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".cfkit.lock"

_held: dict[Path, int] = {}  # lock file -> its descriptor, while this process holds it


class FolderInUse(RuntimeError):
    """Another live process holds the folder; the message names its pid."""


@contextlib.contextmanager
def hold(folder, name: str = LOCK_FILE):
    """Hold ``folder`` (created if missing) for the ``with`` block; ``FolderInUse`` if a live
    process holds it. ``name``: the lock file, for holders that may share a folder (the
    shards of one bench)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = (Path(folder) / name).resolve()
    if path in _held:  # by an enclosing hold, which releases it
        yield
        return
    _held[path] = _acquire(path, Path(folder))
    try:
        yield
    finally:
        fd = _held.pop(path, None)
        if fd is not None:
            os.ftruncate(fd, 0)  # an empty file: released, not left behind by a killed holder
            os.close(fd)


def _close_in_child() -> None:
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _acquire(path: Path, folder: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise FolderInUse(f"{folder} is in use by another cfkit process ({holder}); wait for it "
                          "to finish or choose another --out") from None
    left = _read(fd)
    if left:
        log.warning("%s: taking over the lock of a process that ended without releasing it "
                    "(killed?): %s", folder, left)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """The holder's line; it writes it just after taking the lock, so wait a moment for it."""
    for _ in range(50):
        text = _read(fd)
        if text:
            return text
        time.sleep(0.01)
    return "pid unknown"


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()
