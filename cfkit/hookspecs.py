"""The hooks a cfkit plugin implements.

Every component hook is ``register_<kind>(register)`` where ``register(name, factory)`` adds one
component. ``factory(**options)`` builds the component from its config options (a checkpoint
converter is the exception: it is the conversion itself, see ``register_converters``). Two
more hooks: ``register_defaults(register)`` sets config defaults, so that the core names no
component, and ``register_commands(subparsers)`` adds subcommands to ``cfkit``. Built-in and third-party
plugins use exactly these hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("cfkit")
hookimpl = pluggy.HookimplMarker("cfkit")

KINDS = (
    "methods",
    "image_tokenizers",
    "text_tokenizers",
    "schedules",
    "orderings",
    "weightings",
    "timestep_samplers",
    "samplers",
    "datasets",
    "metrics",
    "feature_networks",
    "paper_tables",
    "converters",
)


@hookspec
def register_methods(register):
    """Training methods (a loss on a batch, e.g. causalfusion, incontext-dit, dit)."""


@hookspec
def register_image_tokenizers(register):
    """Image tokenizers: pixels <-> latents (e.g. pixels, sd-vae, mar-vae)."""


@hookspec
def register_text_tokenizers(register):
    """Text tokenizers: strings <-> token ids."""


@hookspec
def register_schedules(register):
    """Factorisation schedules: AR step sizes for L tokens (see cfkit.schedules)."""


@hookspec
def register_orderings(register):
    """Token orderings over an (h, w) grid (see cfkit.orderings)."""


@hookspec
def register_weightings(register):
    """Loss weightings along the AR axis or the diffusion axis (see cfkit.weightings)."""


@hookspec
def register_timestep_samplers(register):
    """Training timestep samplers: t per (sample, copy, AR step) (see cfkit.timesteps)."""


@hookspec
def register_samplers(register):
    """Diffusion samplers used at generation (e.g. DDPM, DDIM)."""


@hookspec
def register_datasets(register):
    """Datasets that can be written to WebDataset shards."""


@hookspec
def register_metrics(register):
    """Evaluation metrics (FID, CIDEr, linear probe, ...)."""


@hookspec
def register_feature_networks(register):
    """Image feature networks for FID and its kin (see cfkit.metrics.FeatureNetwork)."""


@hookspec
def register_defaults(register):
    """Config defaults: ``register(key, value)`` sets the default of the config key path ``key``,
    e.g. ``register("factorisation.ordering", "random")`` or, for a component with options,
    ``register("factorisation.schedule", {"name": "exp-decay", "gamma": 0.9})``. A key no plugin
    sets is required; two plugins setting one key clash (see ``cfkit.plugins.Registry``)."""


@hookspec
def register_paper_tables(register):
    """The paper's tables that ``cfkit bench`` reports beside its own (a grid's ``table``):
    ``register(KEY, factory)`` where ``factory()`` returns a ``cfkit.paper.PaperTable``."""


@hookspec
def register_converters(register):
    """Checkpoint converters (``cfkit convert SOURCE PATH --out DIR``): ``register(SOURCE,
    convert)`` where ``convert(path, out, kwargs)`` writes a cfkit checkpoint folder ``out``
    from the checkpoint file ``path`` (``kwargs``: constructor kwargs the file lacks, or None)
    and returns the folder."""


@hookspec
def register_commands(subparsers):
    """Subcommands of ``cfkit``: ``subparsers`` is the argparse sub-parser action; add a parser
    with ``subparsers.add_parser(NAME, help=...)`` and ``set_defaults(run=FUNCTION)``, where
    ``FUNCTION(args)`` returns the exit status."""
