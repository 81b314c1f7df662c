"""A training run's log: ``metrics.csv``, TensorBoard scalars and the ``loss.png`` plot.

``metrics.csv`` has one row per ``log_every`` steps, columns ``METRICS``; a resumed run
first drops the rows after its checkpoint's step, then appends its own.
"""

from __future__ import annotations

import csv
from pathlib import Path

from cfkit import checkpoint

METRICS = ("step", "loss", "lr", "grad_norm", "images_per_s")


class RunLog:
    """The log of the run in ``run_dir``; the main process alone writes it."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.metrics = Path(run_dir) / "metrics.csv"
        self.plot_path = Path(run_dir) / "loss.png"
        self.tensorboard_dir = Path(run_dir) / "tensorboard" if tensorboard else None
        self._writer = None  # made at the first row: TensorBoard is imported only when used

    def start(self, step: int) -> None:
        """Continue the log at ``step``: the rows after it are dropped."""
        _truncate_metrics(self.metrics, step)

    def write(self, step: int, loss: float, lr: float, grad_norm: float, rate: float) -> None:
        """Append one row (``rate`` in images per second), and the same to TensorBoard."""
        new = not self.metrics.exists()
        with self.metrics.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(METRICS)
            writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{grad_norm:.4f}", f"{rate:.2f}"])
        if self.tensorboard_dir is not None:
            self._tensorboard(step, loss, grad_norm, rate)

    def _tensorboard(self, step: int, loss: float, grad_norm: float, rate: float) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.tensorboard_dir)
        for name, value in (("loss", loss), ("grad_norm", grad_norm), ("images_per_s", rate)):
            self._writer.add_scalar(name, value, step)

    def plot(self) -> None:
        """Draw ``loss.png`` from ``metrics.csv``."""
        plot_loss(self.metrics, self.plot_path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (a resumed run rewrites them), atomically."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)

    checkpoint.atomic_write(path, write)


def read_metrics(path) -> list[dict]:
    """The rows of a ``metrics.csv``, every value a float."""
    with Path(path).open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def plot_loss(metrics_path: Path, out: Path) -> None:
    """The training loss over the steps (log scale) of ``metrics_path``, as a PNG at ``out``."""
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    checkpoint.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
