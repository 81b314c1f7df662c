"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"): the AdaLN-Zero baseline.

Every token of an image is noised at one timestep t; t and the class label enter each block
through adaptive LayerNorm (shift, scale and gate regressed from their embedding), not as
tokens, so attention is full and unmasked. The network predicts only the diffusion target
(no learned variance), like the CausalFusion network. Of the factorisation config only the
diffusion-axis weighting applies: there is one AR step and one noised copy. The plugin also
brings the converter of facebookresearch/DiT checkpoints (``cfkit convert dit``, in
``cfkit_plugins.dit_convert``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cfkit import hookimpl
from cfkit.loss import DiffusionLoss, global_randn
from cfkit.methods import NOISE_PREDICTION, SAMPLING, Batch, LossOutput, drop_labels
from cfkit.transformer import (
    Attention,
    ClassEmbedder,
    Mlp,
    TimestepEmbedder,
    TokenGrid,
    grid_config,
    patchify,
    sincos_pos_embed,
    unpatchify,
)

ATTENTION_BACKENDS = ("sdpa", "eager")


@dataclass(frozen=True)
class DiTConfig(TokenGrid):
    """Architecture of a DiT: the token grid of ``cfkit.transformer.TransformerConfig`` (same
    defaults and allowed values) with DiT's attention backends; ``qkv_bias`` gives the qkv
    projection a bias, as the reference's (set by ``cfkit convert dit``)."""

    attention: Literal["sdpa", "eager"] = "sdpa"
    qkv_bias: bool = False

    def check(self) -> DiTConfig:
        """``self`` when its fields fit together, else a ValueError saying how."""
        self.check_grid(sincos=True)
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention {self.attention!r}; allowed: {', '.join(ATTENTION_BACKENDS)}"
            )
        if not 0 <= self.class_dropout <= 1:
            raise ValueError(f"class_dropout must be in [0, 1], got {self.class_dropout}")
        return self


# The paper's model sizes (Table 1; patch size is a separate option, DiT-XL/2 = DiT-XL with
# patch_size 2), then a small CPU preset.
PRESETS: dict[str, dict] = {
    "DiT-S": dict(hidden_size=384, depth=12, num_heads=6),
    "DiT-B": dict(hidden_size=768, depth=12, num_heads=12),
    "DiT-L": dict(hidden_size=1024, depth=24, num_heads=16),
    "DiT-XL": dict(hidden_size=1152, depth=28, num_heads=16),
    "DiT-tiny": dict(hidden_size=128, depth=4, num_heads=4),
}


def network_config(model_options: dict) -> DiTConfig:
    """The DiT config from a ``[model]`` table: an optional ``preset`` plus fields."""
    return grid_config(DiTConfig, PRESETS, model_options)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` ``(N, L, D)`` scaled by ``1 + scale`` and shifted by ``shift``, both ``(N, D)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


class LabelEmbedder(ClassEmbedder):
    """Class label -> one vector ``(N, D)``; index ``num_classes`` is the null class (CFG)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout: float):
        super().__init__(num_classes, hidden_size, cond_tokens=1, dropout=dropout)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``(N,)`` -> ``(N, D)``."""
        return super().forward(labels)[:, 0]


class DiTBlock(nn.Module):
    """Transformer block whose two LayerNorms and residual gates are set by the condition
    (adaLN-Zero: the modulation is zero-initialised, so the block starts as the identity)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, config.num_heads, qk_norm=False, backend=config.attention,
                              qkv_bias=config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), fused=config.attention != "eager")
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, L, D)``, condition ``c`` ``(N, D)`` -> ``(N, L, D)``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map back to token values."""

    def __init__(self, dim: int, token_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, token_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, L, D)``, condition ``c`` ``(N, D)`` -> ``(N, L, token_dim)``."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer over patch tokens, conditioned on t + class through adaLN-Zero."""

    capabilities = frozenset()  # no KV cache: it denoises the whole image at once

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config = config.check()
        dim = config.hidden_size
        # A linear map of patchified tokens is the reference's stride-p conv patch embedding.
        self.patch_embed = nn.Linear(config.token_dim, dim)
        self.timestep_embedder = TimestepEmbedder(dim)
        self.label_embedder = LabelEmbedder(config.num_classes, dim, config.class_dropout)
        self.register_buffer("pos_embed", torch.zeros(1, config.num_tokens, dim))
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(dim, config.token_dim)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears with zero biases, fixed sin-cos positions, N(0, 0.02) label table
        and timestep MLP, and zero adaLN modulations and output layer (as the reference):
        every block starts as the identity and the network predicts 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        pos = sincos_pos_embed(self.config.hidden_size, self.config.grid[0])
        self.pos_embed.copy_(torch.from_numpy(pos).float()[None])
        nn.init.normal_(self.label_embedder.table.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.mlp[2].weight, std=0.02)
        for layer in [block.modulation[-1] for block in self.blocks] + [
            self.final_layer.modulation[-1], self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Prediction for noisy ``x``: latents ``(N, C, H, W)`` or tokens ``(N, L, p*p*C)`` in
        raster order; ``t`` ``(N,)`` network timesteps; ``labels`` ``(N,)`` (``num_classes``
        is the null class, for CFG). Returns the same shape as ``x``; no label dropout here."""
        latents = x.dim() == 4
        c = self.condition(t, labels)
        out = self.final_layer(self.run(x, c), c)
        if latents:
            return unpatchify(out, self.config.patch_size, self.config.latent_channels)
        return out

    @property
    def null_label(self) -> int | None:
        """The null class of CFG's unconditional branch (None when trained without dropout)."""
        return self.label_embedder.null_class

    def condition(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The adaLN condition ``(N, D)`` of timesteps ``t`` ``(N,)`` and ``labels`` (None:
        the timestep only)."""
        c = self.timestep_embedder(t)
        return c if labels is None else c + self.label_embedder(labels)

    def run(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Last-block states ``(N, L, D)`` of latents or tokens ``x`` under condition ``c``."""
        tokens = patchify(x, self.config.patch_size) if x.dim() == 4 else x
        h = self.patch_embed(tokens) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return h

    def hidden_states(self, latents: torch.Tensor, t: torch.Tensor,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
        """Last-block states ``(N, L, D)`` (raster order) of ``latents`` ``(N, C, H, W)`` at
        network timestep ``t`` ``(N,)``: the features of a linear probe. ``labels=None`` is
        unconditional: the null class, or no label embedding for a model trained without one."""
        embedder = self.label_embedder
        if labels is None and embedder.table.num_embeddings > embedder.num_classes:
            labels = torch.full((latents.shape[0],), embedder.num_classes, dtype=torch.long,
                                device=latents.device)
        return self.run(latents, self.condition(t, labels))


class DiTMethod:
    """The DiT loss: one uniform t per image, all tokens noised, MSE to the diffusion target,
    weighted along the diffusion axis only."""

    capabilities = frozenset({SAMPLING, NOISE_PREDICTION})  # NOISE_PREDICTION: of one AR step

    def __init__(self, experiment):
        self.experiment = experiment
        self.config = network_config(experiment.model)
        self.model = DiT(self.config)
        self.diffusion = experiment.diffusion.build()
        self.prediction = experiment.diffusion.prediction
        self.diffusion_loss = DiffusionLoss(self.diffusion, self.prediction,
                                            experiment.factorisation.diffusion_weighting.build())

    @classmethod
    def check(cls, experiment) -> None:
        network_config(experiment.model)

    def loss(self, batch: Batch, generator: torch.Generator | None = None,
             model=None) -> LossOutput:
        """``per_token`` is ``(N, 1, L)`` in raster order (one copy, one AR step). Randomness
        is drawn for the global batch; ``model`` is the module to run (default ``self.model``)."""
        latents, labels = batch.latents, batch.labels
        device = latents.device
        x_start = patchify(latents, self.config.patch_size)  # (N, L, d)
        t = self.diffusion_loss.uniform_t(batch, generator)
        noise = global_randn(batch, x_start.shape[1:], generator, device)
        if self.model.training:
            embedder = self.model.label_embedder
            labels = drop_labels(labels, batch, embedder.dropout, embedder.num_classes, generator)
        t_device = t.to(device)
        x_t, target = self.diffusion_loss.corrupt(x_start, t_device, noise)
        out = (self.model if model is None else model)(x_t, self.diffusion_loss.network_t(t_device), labels)
        t_tokens = t[:, None, None]  # one t for every token of an image, the AR step starting at 0
        return self.diffusion_loss(out.unsqueeze(1), target.unsqueeze(1), t_tokens,
                                   torch.zeros_like(t_tokens), x_start.shape[1])

    @torch.no_grad()
    def predict_noise(self, latents, labels, plan, noise) -> torch.Tensor:
        """ε̂ ``(N, K, L, d)`` in generation order (see ``cfkit.methods.NoisePredictor``) for a
        plan of one AR step: every token at its copy's one t, the noise put back in raster
        order, so a raster token gets the same x_t as in any other method."""
        if int(plan.num_steps.max()) != 1:
            raise ValueError("DiT denoises the whole image at once: a plan of one AR step only")
        n, copies, length, dim = noise.shape
        device = latents.device
        order = plan.order.to(device)[:, None, :, None].expand(n, copies, length, dim)
        raster_noise = torch.empty_like(noise).scatter_(2, order, noise)
        x_start = patchify(latents, self.config.patch_size)[:, None].expand(n, copies, length, dim)
        t = plan.t[:, :, 0].to(device)  # (N, K)
        x_t = self.diffusion.q_sample(x_start, t, raster_noise)
        network_t = self.diffusion_loss.network_t(t)
        out = self.model(x_t.flatten(0, 1), network_t.flatten(), labels.repeat_interleave(copies))
        _, eps = self.diffusion.xstart_and_eps(self.prediction, x_t, t, out.float().view_as(x_t))
        return torch.gather(eps, 2, order)


@hookimpl
def register_methods(register):
    register("dit", DiTMethod)


@hookimpl
def register_converters(register):
    """``cfkit convert dit``: facebookresearch/DiT checkpoints (see ``cfkit_plugins.dit_convert``)."""
    from cfkit_plugins.dit_convert import SOURCE, dit_checkpoint  # it builds this module's DiT

    register(SOURCE, dit_checkpoint)
