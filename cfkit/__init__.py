"""cfkit: CausalFusion and its baselines as a toolkit."""

from cfkit.hookspecs import hookimpl
from cfkit.plugins import build, registry

__all__ = ["hookimpl", "build", "registry", "load"]
__version__ = "0.1.0"


def load(checkpoint, device="cpu"):
    """The generation ``Pipeline`` of a checkpoint folder: ``cfkit.load(DIR).generate(classes=
    [1, 2], ar_steps=4, cfg=4.0, seed=0)``. Imported on first use, so that ``import cfkit``
    (as every plugin does) does not load torch."""
    from cfkit.pipeline import Pipeline

    return Pipeline.from_checkpoint(checkpoint, device)
