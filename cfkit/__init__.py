"""cfkit: CausalFusion and its baselines as a toolkit."""

from cfkit.hookspecs import hookimpl
from cfkit.plugins import build, registry

__all__ = ["hookimpl", "build", "registry"]
__version__ = "0.1.0"
