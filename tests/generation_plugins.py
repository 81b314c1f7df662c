"""A third-party plugin for the generation tests (an ordering and a schedule), and a way to
add it to the process registry as its entry point would."""

import torch

import cfkit
from cfkit import plugins


class ReverseRaster:
    def __call__(self, batch_size, grid, generator=None):
        return torch.arange(grid[0] * grid[1]).flip(0).expand(batch_size, -1)


class Halves:
    def __call__(self, num_tokens, generator=None):
        return torch.tensor([num_tokens // 2, num_tokens - num_tokens // 2])


class ThirdParty:
    @staticmethod
    @cfkit.hookimpl
    def register_orderings(register):
        register("reverse-raster", ReverseRaster)

    @staticmethod
    @cfkit.hookimpl
    def register_schedules(register):
        register("halves", Halves)


def install_third_party(monkeypatch) -> plugins.Registry:
    """Replace the process registry by one with every entry-point plugin plus ThirdParty."""
    registry = plugins.Registry(plugins.plugin_manager((ThirdParty,)))
    monkeypatch.setattr(plugins, "registry", lambda: registry)
    return registry
