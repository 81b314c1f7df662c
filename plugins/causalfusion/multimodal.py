"""Multimodal CausalFusion and its Transfusion baseline (paper, Multimodal; Table 6a).

Both put a caption and an image in one decoder-only sequence (``cfkit.multimodal``) and train
on image + caption data with the paper's mix: with probability ``t2i_probability`` (0.9) the
caption precedes the image (text-to-image: image loss only, the caption dropped to the null
caption with probability ``caption_dropout`` for CFG); otherwise the image precedes the
caption (captioning: the next-token loss of the caption, weight ``caption_weight`` (0.01),
plus the image loss, an image model that sees no text).

- ``causalfusion-multimodal``: the image is dual-factorised (AR steps, noise levels) as in
  CausalFusion; the caption sees the image's *clean* tokens.
- ``transfusion``: the paper's re-implementation of Transfusion on the same backbone,
  tokenizers and data: one AR step whose tokens are the noised image itself, bidirectional
  inside the image and causal across the sequence, so the caption sees the *noised* image.
"""

from __future__ import annotations

import torch
from cfkit_plugins.causalfusion import CausalFusion, network_config, one_step

from cfkit import hookimpl
from cfkit.masks import multimodal_layout
from cfkit.methods import AR_PLANS, CAPTIONING, SAMPLING, TEXT_CONDITIONING, Batch, LossOutput
from cfkit.multimodal import (
    MultimodalTransformer,
    caption_loss,
    check_network,
    choose_captions,
    frame_captions,
    split_model_options,
)
from cfkit.plan import Plan
from cfkit.transformer import TransformerConfig, patchify

# [method] options and their defaults (the paper's).
MIX = {"t2i_probability": 0.9, "caption_weight": 0.01, "caption_dropout": 0.1}


def training_mix(options: dict, defaults: dict, num_timesteps: int) -> dict:
    """The ``[method]`` options over ``defaults``: probabilities, weights, a noise limit."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown method option(s) {unknown}; allowed: {', '.join(defaults)}")
    mix = {**defaults, **options}
    for name in ("t2i_probability", "caption_dropout"):
        if not 0 <= mix[name] <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {mix[name]}")
    if mix["caption_weight"] < 0:
        raise ValueError(f"caption_weight must be >= 0, got {mix['caption_weight']}")
    limit = mix.get("caption_max_t")
    if limit is not None and not (isinstance(limit, int) and 1 <= limit <= num_timesteps):
        raise ValueError(f"caption_max_t must be an int in 1..{num_timesteps} (diffusion "
                         f"timesteps), got {limit!r}")
    return mix


def text_tokenizer(experiment):
    spec = experiment.data.text_tokenizer
    if spec is None:
        raise ValueError(f"method {experiment.method.name!r} needs data.text_tokenizer, e.g. "
                         "text_tokenizer = { name = \"bytes\" }")
    return spec.build()


class MultimodalCausalFusion(CausalFusion):
    """CausalFusion over ``[cond | caption | image]`` sequences: the dual-factorised image loss
    plus the caption's next-token loss (see the module docstring for the training mix)."""

    network_class = MultimodalTransformer
    options = MIX
    capabilities = frozenset({SAMPLING, AR_PLANS, CAPTIONING, TEXT_CONDITIONING})

    def __init__(self, experiment):
        self.mix = training_mix(experiment.method.options, self.options,
                                experiment.diffusion.num_timesteps)
        self.text_tokenizer = text_tokenizer(experiment)
        self.max_text_len = split_model_options(experiment.model)[1]["max_text_len"]
        super().__init__(experiment)

    @classmethod
    def network_config(cls, experiment) -> TransformerConfig:
        return network_config(split_model_options(experiment.model)[0])

    @classmethod
    def check(cls, experiment) -> None:
        text = split_model_options(experiment.model)[1]
        check_network(cls.network_config(experiment), **text)
        training_mix(experiment.method.options, cls.options, experiment.diffusion.num_timesteps)
        text_tokenizer(experiment)

    def network(self) -> MultimodalTransformer:
        return self.network_class(self.config, self.text_tokenizer.vocab_size, self.max_text_len,
                                  self.text_tokenizer.pad_id)

    def frame(self, captions: list[str]) -> torch.Tensor:
        """Framed caption ids ``(N, max_text_len)``."""
        return frame_captions(self.text_tokenizer, captions, self.max_text_len)

    def loss(self, batch: Batch, generator: torch.Generator | None = None,
             model=None) -> LossOutput:
        plan, noise = self.draw(batch, generator)
        device = batch.latents.device
        text = self.frame(choose_captions(batch, generator)).to(device)
        total, rows = batch.total, batch.rows
        text_first = torch.rand(total, generator=generator) < self.mix["t2i_probability"]
        dropped = (torch.rand(total, generator=generator) < self.mix["caption_dropout"])[rows]
        captioned = int((~text_first).sum())  # image-then-text rows of the global batch
        text_first = text_first[rows]
        if self.model.training:
            null = (dropped & text_first).to(device)[:, None]
            text = torch.where(null, self.model.null_label, text)
        return self.multimodal_loss(batch.latents, text, text_first.to(device),
                                    self.caption_noise(plan, text_first), noise, model=model,
                                    rows_per_caption=total / max(1, captioned))

    def caption_noise(self, plan: Plan, text_first: torch.Tensor) -> Plan:
        """The plan of the image-then-text rows: CausalFusion's captions see clean tokens
        whatever the image's t."""
        return plan

    def multimodal_loss(self, latents, text, text_first, plan, noise, model=None,
                        rows_per_caption: float | None = None) -> LossOutput:
        """The loss of one plan for final caption ids ``text`` ``(N, n)`` and orders
        ``text_first`` ``(N,)``: the image loss of every row plus ``caption_weight`` times
        the caption loss of the image-then-text rows. The caption loss sums over those rows
        times ``rows_per_caption / N`` (global rows per captioned row; default: this batch's),
        so that averaging over processes gives the global mean."""
        x_start, x_t, t, target = self.noised(latents, plan, noise)
        network_t = self.diffusion_loss.network_t(t)
        network = self.model if model is None else model
        image, logits = network(x_start, x_t, network_t, text, plan, text_first)
        out = self.weighted_loss(image, target, t, plan)
        captioned = ~text_first
        if rows_per_caption is None:
            rows_per_caption = len(text) / max(1, int(captioned.sum()))
        per_caption = caption_loss(logits, text, self.text_tokenizer.eos_id)
        caption = (per_caption * captioned).sum() * rows_per_caption / len(text)
        loss = out.loss + self.mix["caption_weight"] * caption
        return LossOutput(loss, out.per_token, plan, {"image": out.loss.detach(),
                                                      "caption": caption.detach()})

    @torch.no_grad()
    def caption(self, latents: torch.Tensor, generator: torch.Generator | None = None,
                **decoding) -> list[str]:
        """Captions of images given as latents ``(N, C, H, W)``; ``decoding`` as
        ``cfkit.captioning.caption``'s (greedy by default)."""
        from cfkit.captioning import caption

        tokens = patchify(latents.to(self.model.pos_embed), self.config.patch_size)
        ids = caption(self.model, tokens, self.text_tokenizer, generator=generator, **decoding)
        return [self.text_tokenizer.decode(row) for row in ids.tolist()]


class TransfusionTransformer(MultimodalTransformer):
    """Transfusion's sequence on the same backbone: ``[cond | caption | noised image]``,
    the noised image tokens (t added) one AR step seen by a caption after them."""

    def forward(self, x_start, x_t, t, text, plan, text_first):
        """As ``MultimodalTransformer.forward`` for one noised copy: ``x_t`` ``(N, 1, L, d)``
        are the image tokens themselves (``x_start`` is not seen)."""
        config = self.config
        n, copies, length, _ = x_t.shape
        if copies != 1:
            raise ValueError(f"transfusion noises each image once, got {copies} copies")
        text_len = text.shape[1]
        order = plan.order.to(x_t.device)
        image = self.embed(x_t[:, 0], order) + self.timestep_embedder(t[:, 0])
        layout = multimodal_layout(config.cond_len, torch.zeros_like(plan.step), text_len,
                                   text_first.cpu(), copies=0)
        x = torch.cat([self.start(n), self.text_embedder(text), image], dim=1)
        x = self.run(x, self.attention_mask(layout.to(x.device)))
        logits = self.text_head(x[:, config.cond_len:config.cond_len + text_len])
        return self.final_layer(x[:, -length:]).unsqueeze(1), logits

    def image_context(self, tokens, positions):
        """A given image is a noised image at t = 0."""
        t = torch.zeros(positions.shape, dtype=torch.long, device=positions.device)
        return self.embed(tokens, positions) + self.timestep_embedder(t)


class Transfusion(MultimodalCausalFusion):
    """The Transfusion loss: ``MultimodalCausalFusion``'s on the Transfusion sequence, with an
    optional noise limit ``caption_max_t`` for the images of captioning rows (default none:
    the captions see the image at any noise level)."""

    network_class = TransfusionTransformer
    options = {**MIX, "caption_max_t": None}

    def caption_noise(self, plan: Plan, text_first: torch.Tensor) -> Plan:
        """With ``caption_max_t``, the image of an image-then-text row is noised at
        ``t * caption_max_t // T`` for the drawn t (uniform below the limit)."""
        limit = self.mix["caption_max_t"]
        if limit is None:
            return plan
        limited = plan.t * limit // self.diffusion.num_timesteps
        return Plan(plan.order, plan.step, torch.where(text_first.cpu()[:, None, None], plan.t, limited))


def transfusion(experiment):
    """Transfusion: one AR step in raster order (the image noised at one t), no AR weighting,
    the Transfusion sequence."""
    return Transfusion(one_step(experiment, copies=1))


transfusion.check = Transfusion.check
transfusion.network_config = Transfusion.network_config
transfusion.capabilities = Transfusion.capabilities


@hookimpl
def register_methods(register):
    register("causalfusion-multimodal", MultimodalCausalFusion)
    register("transfusion", transfusion)
