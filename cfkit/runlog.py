"""A training run's log: ``metrics.csv``, the ``loss.png`` plot and, when turned on,
TensorBoard scalars and a W&B run.

``metrics.csv`` has one row per ``log_every`` steps, columns ``METRICS``; a resumed run
first drops the rows after its checkpoint's step, then appends its own. TensorBoard and W&B
are optional extras (``pip install 'cfkit[tensorboard]'``, ``'cfkit[wandb]'``): a run that
turns one on without its package stops before its first step, naming the extra
(``require_trackers``).
"""

from __future__ import annotations

import csv
import importlib
import uuid
from pathlib import Path

from cfkit import checkpoint
from cfkit.config import ConfigError

METRICS = ("step", "loss", "lr", "grad_norm", "images_per_s")
TRACKERS = ("tensorboard", "wandb")  # train settings, each named as its package and its extra


def require_trackers(settings) -> None:
    """A ConfigError naming the extra to install when the train ``settings`` turn on a tracker
    whose package is missing. Checked when a run starts, not when a config is read: a config
    validates on a machine that only writes it."""
    for name in TRACKERS:
        if not getattr(settings, name):
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"train.{name} = true needs the {name} package, which is not installed: "
                              f"pip install 'cfkit[{name}]' (or set train.{name} = false)") from None


class TensorBoard:
    """The scalars of each logged step in ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(Path(run_dir) / "tensorboard")

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """The scalars of each logged step in a W&B run of ``project`` named after the experiment,
    its files in ``run_dir/wandb``; a resumed run continues the same W&B run (its id is kept in
    ``run_dir/wandb-id``). ``WANDB_MODE=offline`` logs without an account or a network."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict):
        import wandb

        id_file = Path(run_dir) / "wandb-id"
        if not id_file.exists():
            checkpoint.atomic_write(id_file, lambda tmp: Path(tmp).write_text(uuid.uuid4().hex[:16]))
        self.run = wandb.init(project=project, name=name, id=id_file.read_text().strip(), resume="allow",
                              dir=str(run_dir), config=config)

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """The log of the run in ``run_dir``; the main process alone writes it. ``settings`` (train)
    turn the trackers on; ``experiment`` names the W&B run and is its config."""

    def __init__(self, run_dir: Path, settings=None, experiment=None):
        self.run_dir = Path(run_dir)
        self.metrics = self.run_dir / "metrics.csv"
        self.plot_path = self.run_dir / "loss.png"
        self.settings, self.experiment = settings, experiment
        self.trackers: list = []  # made at start: a tracker's package is imported only when used

    def start(self, step: int) -> None:
        """Continue the log at ``step``: the rows after it are dropped; the trackers open."""
        _truncate_metrics(self.metrics, step)
        settings = self.settings
        if settings is not None and settings.tensorboard:
            self.trackers.append(TensorBoard(self.run_dir))
        if settings is not None and settings.wandb:
            self.trackers.append(WandB(self.run_dir, settings.wandb_project, self.experiment.name,
                                       self.experiment.model_dump(mode="json")))

    def write(self, step: int, loss: float, lr: float, grad_norm: float, rate: float) -> None:
        """Append one row (``rate`` in images per second), and the same to each tracker."""
        new = not self.metrics.exists()
        with self.metrics.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(METRICS)
            writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{grad_norm:.4f}", f"{rate:.2f}"])
        values = dict(zip(METRICS[1:], (loss, lr, grad_norm, rate), strict=True))
        for tracker in self.trackers:
            tracker.write(step, values)

    def close(self) -> None:
        """Flush and close the trackers."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

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
