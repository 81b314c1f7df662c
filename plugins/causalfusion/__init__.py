"""CausalFusion and In-context DiT: the dual-factorised diffusion loss on the causal
transformer. In-context DiT is the S = 1 case of the same code, set by configuration. The
plugin also brings the paper's tables (``cfkit_plugins.causalfusion.paper``), its multimodal
methods (``cfkit_plugins.causalfusion.multimodal``, an entry point of its own) and the
converter of the official CausalFusion checkpoints (``cfkit convert official``)."""

from __future__ import annotations

import torch
from cfkit_plugins.causalfusion import paper

from cfkit import convert, hookimpl
from cfkit.loss import DiffusionLoss, global_randn
from cfkit.methods import AR_PLANS, NOISE_PREDICTION, SAMPLING, Batch, LossOutput, drop_labels
from cfkit.plan import Plan
from cfkit.transformer import PRESETS, CausalTransformer, TransformerConfig, grid_config, patchify


def network_config(model_options: dict) -> TransformerConfig:
    """The transformer config from a ``[model]`` table: an optional ``preset`` plus fields."""
    return grid_config(TransformerConfig, PRESETS, model_options)


class CausalFusion:
    """Dual factorisation: AR steps from the schedule, noise levels from the timestep sampler.

    For a batch: draw a plan (order, AR steps, t per copy and step), noise the tokens of every
    step (K copies), predict each step's noise from the clean tokens of earlier steps, and
    weight the squared error by the AR-axis and diffusion-axis weights.
    """

    capabilities = frozenset({SAMPLING, AR_PLANS, NOISE_PREDICTION})

    def __init__(self, experiment):
        self.experiment = experiment
        self.config = self.network_config(experiment)
        self.model = self.network()
        self.diffusion = experiment.diffusion.build()
        self.prediction = experiment.diffusion.prediction
        factorisation = experiment.factorisation
        self.planner = factorisation.planner()
        self.diffusion_loss = DiffusionLoss(self.diffusion, self.prediction,
                                            factorisation.diffusion_weighting.build(),
                                            factorisation.ar_weighting.build())

    @classmethod
    def network_config(cls, experiment) -> TransformerConfig:
        return network_config(experiment.model)

    check = network_config

    def network(self) -> CausalTransformer:
        return CausalTransformer(self.config)

    def loss(self, batch: Batch, generator: torch.Generator | None = None,
             model=None) -> LossOutput:
        plan, noise = self.draw(batch, generator)
        labels = batch.labels
        if self.model.training:
            embedder = self.model.class_embedder
            labels = drop_labels(labels, batch, embedder.dropout, embedder.num_classes, generator)
        return self.plan_loss(batch.latents, labels, plan, noise, model=model)

    def draw(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[Plan, torch.Tensor]:
        """This batch's rows of a plan and of its noise ``(N, K, L, d)``, drawn for the global batch."""
        total, rows = batch.total, batch.rows
        plan = self.planner.draw(total, self.config.grid, self.diffusion.num_timesteps, generator)
        plan = Plan(plan.order[rows], plan.step[rows], plan.t[rows])
        shape = (plan.copies, self.config.num_tokens, self.config.token_dim)
        return plan, global_randn(batch, shape, generator, batch.latents.device)

    def plan_loss(self, latents, labels, plan, noise, model=None):
        """The loss of one plan given final labels: ``noise`` ``(N, K, L, d)`` in generation
        order; ``model`` the module to run (default ``self.model``)."""
        x_start, x_t, t, target = self.noised(latents, plan, noise)
        out = self.predict(x_start, x_t, t, labels, plan, model)
        return self.weighted_loss(out, target, t, plan)

    def predict(self, x_start, x_t, t, labels, plan, model=None) -> torch.Tensor:
        """The network output ``(N, K, L, d)`` for the inputs ``noised`` gives, at diffusion
        timesteps ``t`` ``(N, K, L)``."""
        network_t = self.diffusion_loss.network_t(t)
        return (self.model if model is None else model)(x_start, x_t, network_t, labels, plan)

    @torch.no_grad()
    def predict_noise(self, latents, labels, plan, noise) -> torch.Tensor:
        """ε̂ ``(N, K, L, d)`` in generation order (see ``cfkit.methods.NoisePredictor``)."""
        x_start, x_t, t, _ = self.noised(latents, plan, noise)
        out = self.predict(x_start, x_t, t, labels, plan).float()
        return self.diffusion.xstart_and_eps(self.prediction, x_t, t, out)[1]

    def noised(self, latents, plan, noise):
        """The diffusion inputs of a plan: clean tokens ``(N, L, d)`` in raster order, noisy
        tokens ``x_t`` ``(N, K, L, d)`` in generation order, their timesteps ``t``
        ``(N, K, L)`` and the regression target ``(N, K, L, d)``."""
        x_start = patchify(latents, self.config.patch_size)  # (N, L, d) raster
        t = plan.t_per_token().to(latents.device)  # (N, K, L)
        order = plan.order.to(latents.device)
        x_ordered = torch.gather(x_start, 1, order[..., None].expand(-1, -1, x_start.shape[-1]))
        x_t, target = self.diffusion_loss.corrupt(x_ordered.unsqueeze(1), t, noise)
        return x_start, x_t, t, target

    def weighted_loss(self, out, target, t, plan) -> LossOutput:
        """Squared error of the prediction ``out`` ``(N, K, L, d)``, weighted along the AR and
        the diffusion axes."""
        return self.diffusion_loss(out, target, t, plan.step_start().unsqueeze(1), plan.num_tokens, plan)


def one_step(experiment, **update):
    """``experiment`` in the S = 1 configuration of the baselines: one AR step in raster order
    with a constant AR-axis weight (plus any other factorisation fields in ``update``)."""
    from cfkit.config import Component  # not at import: cfkit.config loads the plugins

    factorisation = experiment.factorisation.model_copy(update={
        "schedule": Component(kind="schedules", name="fixed", steps=1),
        "ordering": Component(kind="orderings", name="raster"),
        "ar_weighting": Component(kind="weightings", name="constant"),
        **update,
    })
    return experiment.model_copy(update={"factorisation": factorisation})


def incontext_dit(experiment):
    """In-context DiT: CausalFusion with one AR step and no AR-axis weighting."""
    return CausalFusion(one_step(experiment))


incontext_dit.check = incontext_dit.network_config = CausalFusion.network_config
incontext_dit.capabilities = CausalFusion.capabilities


@hookimpl
def register_methods(register):
    register("causalfusion", CausalFusion)
    register("incontext-dit", incontext_dit)


@hookimpl
def register_defaults(register):
    """CausalFusion and the paper's factorisation: S ~ exp-decay (γ 0.9) in a random order, AR
    loss weights linear from 2 to 1, constant along the diffusion axis, t shared by the steps."""
    register("method", "causalfusion")
    register("factorisation.schedule", {"name": "exp-decay", "gamma": 0.9})
    register("factorisation.ordering", "random")
    register("factorisation.ar_weighting", {"name": "linear", "w_max": 2.0, "w_min": 1.0})
    register("factorisation.diffusion_weighting", "constant")
    register("factorisation.timesteps", "shared")


def official_checkpoint(path, out, kwargs: dict | None = None):
    """An official CausalFusion checkpoint (the reference trainer's ``.pt``, EMA weights when
    present) as a cfkit checkpoint folder ``out`` of the causalfusion method."""
    model, config = convert.load_official(path, kwargs)
    return convert.save_converted(path, out, "causalfusion", model, config, source=convert.OFFICIAL)


@hookimpl
def register_converters(register):
    register(convert.OFFICIAL, official_checkpoint)


@hookimpl
def register_paper_tables(register):
    for key, table in paper.TABLES.items():
        register(key, paper.constant(table))
