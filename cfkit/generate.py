"""Generation: AR steps over a KV cache, each step's tokens denoised by a reverse diffusion.

The L tokens are generated in an order ``(N, L)`` split into S AR steps. The condition tokens
(``[labels; null]`` under classifier-free guidance) go into a KV cache first; every AR step
then starts its tokens from Gaussian noise, runs the respaced reverse process against the
cache (conditional and unconditional halves in one batched forward) and pushes its final
clean tokens into the cache for the steps after it. S = 1 is plain in-context diffusion
sampling. ``RecomputedContext`` runs the same algorithm through the training forward,
recomputing the whole context at every diffusion step: the oracle of the cached path and
the baseline of its benchmark. Editing keeps some tokens of an image as a first, given AR
step and generates the others after it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cfkit import plugins
from cfkit import precision as precisions
from cfkit.methods import CAUSAL_GENERATION, TEXT_CONDITIONING, can
from cfkit.orderings import check_order
from cfkit.plan import Plan
from cfkit.precision import Precision
from cfkit.samplers import SampleGenerators, noise_like, respaced, shared_generator
from cfkit.schedules import check_step_sizes, equal_split, step_index
from cfkit.transformer import CausalTransformer, guide, patchify, unpatchify

KEEP_REGIONS = ("centre", "top", "bottom")
Progress = Callable[[int, int], None]  # (diffusion steps done, total)
# One generator for the batch, or one per sample; None: torch's global generator.
Generators = torch.Generator | SampleGenerators | None


class GenerationError(ValueError):
    """Generation options that cannot work; the message says what is wrong and what is allowed."""


@dataclass(frozen=True)
class SamplingOptions:
    """How images are sampled, passed whole from the CLI, the bench's ``[evaluation]``,
    ``cfkit.evaluate`` and the ``Pipeline`` down to ``generate``, ``edit`` and ``text_to_image``.

    The AR steps are ``ar_steps`` equal steps, explicit ``step_sizes`` or one draw of a
    ``schedule`` (one AR step if none), generated in ``order`` (a registered ordering or an
    object); each AR step runs ``steps`` diffusion steps (N, ``ddimN`` or a comma list), shared
    across the AR steps with ``split_steps``. ``cfg`` is the guidance scale (1 = none) applied at
    network timesteps ``cfg_interval[0] <= t < cfg_interval[1]``; ``sampler`` a registered
    sampler (built with ``sampler_options``) or an object. A ``Pipeline`` draws sample ``i``
    of a set from generators seeded by ``(seed, i)`` (``cfkit.samplers.SampleGenerators``),
    ``batch_size`` images at a time: the set does not depend on the batch size.
    ``cached=False`` recomputes the context at every diffusion step (the KV cache's oracle).
    ``precision`` is ``fp32``, ``bf16`` (autocast) or ``auto`` (``cfkit.precision``); the
    ``Generated`` result says which ran and why.
    An ``order`` or ``sampler`` not given is the one a plugin sets (``sampling.order``,
    ``sampling.sampler``), read when the options are built."""

    ar_steps: int | None = None
    step_sizes: Any = None
    schedule: Any = None
    order: Any = dataclasses.field(default_factory=lambda: _plugin_default("sampling.order"))
    steps: int | str = 250
    split_steps: bool = False
    cfg: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, math.inf)
    sampler: Any = dataclasses.field(default_factory=lambda: _plugin_default("sampling.sampler"))
    sampler_options: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 250
    seed: int = 0
    cached: bool = True
    precision: str = "auto"

    def __post_init__(self):
        for name in ("order", "sampler"):
            if getattr(self, name) is None:
                raise GenerationError(f"{name}: give a registered name or an object, got None "
                                      f"(leave it out for the default)")
        try:
            precisions.check(self.precision)
        except ValueError as error:
            raise GenerationError(str(error)) from None
        for name, least in (("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise GenerationError(f"{name} must be an integer >= {least}, got {value!r}")
        if not isinstance(self.sampler_options, dict):
            raise GenerationError(f"sampler_options must be a dict of the sampler's options, got "
                                  f"{self.sampler_options!r}")

    @classmethod
    def of(cls, options: SamplingOptions | None = None, **fields) -> SamplingOptions:
        """``options`` (default: the defaults) with ``fields`` replaced; an unknown field is
        an error naming the allowed ones."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(cls))
            raise GenerationError(f"unknown sampling option {unknown[0]!r}; allowed: {allowed}")
        return dataclasses.replace(options or cls(), **fields)

    def built_sampler(self):
        """The sampler object: the registered ``sampler`` built with ``sampler_options``."""
        return build_component("samplers", self.sampler, **self.sampler_options)

    def fields(self) -> dict:
        """Every option by name (objects as they are)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance with ``scale`` (1 = none) at network timesteps
    ``interval[0] <= t < interval[1]``."""

    scale: float = 1.0
    interval: tuple[float, float] = (0.0, math.inf)

    @property
    def active(self) -> bool:
        return self.scale > 1.0

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, ...)`` for the rows the network runs: ``(2N, ...)`` when guided."""
        return torch.cat([x, x]) if self.active else x

    def labels(self, labels: torch.Tensor, null: int) -> torch.Tensor:
        """``(N, ...)`` -> ``[labels; null]`` ``(2N, ...)`` when guided, else ``labels`` (class
        labels, or caption ids whose null caption is all ``null``)."""
        return torch.cat([labels, torch.full_like(labels, null)]) if self.active else labels


@dataclass(frozen=True)
class Generated:
    """Generated tokens ``(N, L, d)`` in raster order, the generation ``order`` ``(N, L)`` and
    the ``step_sizes`` ``(S,)`` of the generated AR steps (after any given tokens)."""

    tokens: torch.Tensor
    order: torch.Tensor
    step_sizes: torch.Tensor
    patch_size: int
    channels: int
    precision: Precision | None = None  # what the network ran in (None: nothing generated)

    @property
    def latents(self) -> torch.Tensor:
        """``(N, C, H, W)``."""
        return unpatchify(self.tokens, self.patch_size, self.channels)


class CachedContext:
    """The clean context (condition tokens, then every finished AR step) held as a KV cache."""

    def __init__(self, model: CausalTransformer, labels: torch.Tensor, order: torch.Tensor,
                 guidance: Guidance):
        self.model, self.order, self.guidance = model, order, guidance
        self.cache = model.new_cache()
        model.push_condition(self.cache, guidance.labels(labels, model.null_label))

    def add(self, tokens: torch.Tensor, span: slice) -> None:
        """Push clean ``tokens`` ``(N, n, d)`` of the generation-order positions ``span``."""
        rows = self.guidance.rows
        self.model.push_clean(self.cache, rows(tokens), rows(self.order[:, span]))

    def predict(self, x_t: torch.Tensor, span: slice, t: torch.Tensor) -> torch.Tensor:
        """Guided prediction ``(N, n, d)`` for noisy ``x_t`` at ``span``, network timesteps ``t``."""
        g = self.guidance
        return self.model.guided_cached(self.cache, x_t, self.order[:, span], t, g.scale, g.interval)


class RecomputedContext:
    """The same context recomputed by the training forward at every diffusion step: the full
    sequence ``[cond | clean | noisy]`` of the generation's split, with the tokens not yet
    generated left at zero (the mask hides them from the step being denoised)."""

    def __init__(self, model: CausalTransformer, labels: torch.Tensor, order: torch.Tensor,
                 step_sizes: torch.Tensor, guidance: Guidance):
        self.model, self.order, self.guidance = model, order, guidance
        self.labels = guidance.labels(labels, model.null_label)
        # Plans live on the CPU, as the planner draws them; the forward moves what it needs.
        self.plan_order = guidance.rows(order).cpu()
        self.step = step_index(step_sizes.cpu()).expand_as(self.plan_order)  # (rows, L)
        n, length = order.shape
        weight = model.patch_embed.weight
        self.x_start = torch.zeros(n, length, model.config.token_dim, device=weight.device,
                                   dtype=weight.dtype)

    def add(self, tokens: torch.Tensor, span: slice) -> None:
        index = self.order[:, span, None].expand(-1, -1, tokens.shape[-1])
        self.x_start = self.x_start.scatter(1, index, tokens.to(self.x_start))

    def predict(self, x_t: torch.Tensor, span: slice, t: torch.Tensor) -> torch.Tensor:
        g = self.guidance
        n, length = self.order.shape
        noisy = x_t.new_zeros(n, 1, length, x_t.shape[-1])
        noisy[:, 0, span] = x_t
        rows_t = g.rows(t)
        num_steps = int(self.step[0, -1]) + 1
        plan = Plan(self.plan_order, self.step, rows_t.cpu()[:, None, None].expand(-1, 1, num_steps))
        token_t = rows_t[:, None, None].expand(-1, 1, length)
        out = self.model(g.rows(self.x_start), g.rows(noisy), token_t, self.labels, plan)[:, 0, span]
        return guide(*out.chunk(2), t, g.scale, g.interval) if g.active else out


class WholeImageContext:
    """No context at all, for a network that denoises every token at once (e.g. DiT's adaLN
    conditioning, without a causal mask): one AR step, each prediction a forward of the
    whole image in raster order."""

    def __init__(self, model, labels: torch.Tensor, order: torch.Tensor, guidance: Guidance):
        self.model, self.order, self.guidance = model, order, guidance
        self.labels = guidance.labels(labels, model.null_label)

    def predict(self, x_t: torch.Tensor, span: slice, t: torch.Tensor) -> torch.Tensor:
        g = self.guidance
        index = self.order[:, :, None].expand_as(x_t)
        raster = torch.empty_like(x_t).scatter(1, index, x_t)
        out = self.model(g.rows(raster), g.rows(t), self.labels)
        out = guide(*out.chunk(2), t, g.scale, g.interval) if g.active else out
        return torch.gather(out, 1, index)


def network_precision(model, requested: str) -> Precision:
    """What precision ``requested`` means for ``model``: its device, width and weights' dtype."""
    weight = model.patch_embed.weight
    return precisions.resolve(requested, weight.device, model.config.hidden_size, weight.dtype)


def denoises_whole_image(model) -> bool:
    """Whether ``model`` has no KV cache (no causal mask) and so generates in one AR step."""
    return not can(model, CAUSAL_GENERATION)


def reverse_process(predict: Callable, diffusion, sampler, x: torch.Tensor, prediction: str,
                    generator: Generators = None,
                    on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """x_T ``(N, n, d)`` -> x_0 through every step of the (respaced) ``diffusion``;
    ``predict(x_t, network_t)`` is the network output for x_t."""
    n = x.shape[0]
    timestep_map = diffusion.timestep_map.to(x.device)
    for index in reversed(range(diffusion.num_timesteps)):
        t = torch.full((n,), index, dtype=torch.long, device=x.device)
        output = predict(x, timestep_map[t])
        x = sampler.step(diffusion, output.to(x.dtype), x, t, prediction, generator)
        if on_step is not None:
            on_step()
    return x


def _plugin_default(key: str):
    """The default a plugin sets for ``key`` (``plugins.default``), or a GenerationError."""
    try:
        return plugins.default(key)
    except plugins.NoDefaultError as error:
        raise GenerationError(str(error)) from None


def build_component(kind: str, spec, **options):
    """A registered component by name (built with ``options``), or ``spec`` itself."""
    if not isinstance(spec, str):
        return spec
    try:
        return plugins.build(kind, spec, **options)
    except (TypeError, ValueError) as error:
        raise GenerationError(f"{kind} {spec!r} with options {options}: {error}") from None


def check_labels(model: CausalTransformer, labels) -> torch.Tensor:
    """Class labels as a LongTensor ``(N,)``, each in ``0..num_classes-1``."""
    if can(model, TEXT_CONDITIONING):
        raise GenerationError(f"{type(model).__name__} generates from captions, not classes: "
                              "use text_to_image (cfkit sample --prompt)")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    classes = model.config.num_classes
    if labels.numel() == 0:
        raise GenerationError("no class labels given; give at least one")
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.numel():
        raise GenerationError(
            f"class {int(bad[0])} is out of range; this model has {classes} classes: allowed "
            f"0..{classes - 1}"
        )
    return labels


def guidance_for(model: CausalTransformer, scale: float, interval) -> Guidance:
    """The guidance of a CFG ``scale`` >= 1 and a network-timestep ``interval`` (lo, hi)."""
    lo, hi = (float(v) for v in interval)
    if not 1 <= scale < math.inf:  # not NaN either
        raise GenerationError(f"cfg scale must be >= 1 (1 = no guidance) and finite, got {scale}")
    if not 0 <= lo < hi:
        raise GenerationError(f"cfg interval must be 0 <= lo < hi (network timesteps), got {interval}")
    if scale > 1 and model.null_label is None:
        raise GenerationError("this model has no null class (trained without label dropout): "
                              "classifier-free guidance needs one; use cfg 1")
    return Guidance(float(scale), (lo, hi))


def generation_order(order, batch_size: int, grid: tuple[int, int],
                     generator: Generators = None) -> torch.Tensor:
    """``(N, L)`` raster indices in generation order from an ordering (name or object); with
    ``SampleGenerators``, row i is the ordering's draw for one image from sample i's."""
    ordering = build_component("orderings", order)
    if isinstance(generator, SampleGenerators):
        result = torch.cat([ordering(1, grid, row) for row in generator.rows])
    else:
        result = ordering(batch_size, grid, generator)
    try:
        return check_order(result, batch_size, grid, order)
    except ValueError as error:
        raise GenerationError(str(error)) from None


def ar_step_sizes(num_tokens: int, ar_steps: int | None = None, step_sizes=None, schedule=None,
                  generator: Generators = None) -> torch.Tensor:
    """Sizes ``(S,)`` of the AR steps over ``num_tokens``: ``ar_steps`` equal steps, explicit
    ``step_sizes`` or one draw of a ``schedule`` (name or object; from ``SampleGenerators``'
    shared generator, so that every batch of a set draws the same split); one AR step if none."""
    chosen = [name for name, value in (("ar_steps", ar_steps), ("step_sizes", step_sizes),
                                       ("schedule", schedule)) if value is not None]
    if len(chosen) > 1:
        raise GenerationError(f"give one of ar_steps, step_sizes and schedule, not {' and '.join(chosen)}")
    if step_sizes is not None:
        sizes = step_sizes
    elif schedule is not None:
        sizes = build_component("schedules", schedule)(num_tokens, shared_generator(generator))
    else:
        steps = 1 if ar_steps is None else int(ar_steps)
        if not 1 <= steps <= num_tokens:
            raise GenerationError(f"ar_steps must be in 1..{num_tokens} (the number of tokens to "
                                  f"generate), got {steps}")
        sizes = equal_split(num_tokens, steps)
    try:
        return check_step_sizes(sizes, num_tokens)
    except ValueError as error:
        raise GenerationError(str(error)) from None


def step_diffusions(diffusion, steps, num_ar_steps: int, split_steps: bool = False) -> list:
    """The respaced diffusion of each AR step: ``steps`` each, or, with ``split_steps``, the
    int ``steps`` split across the AR steps as equally as possible."""
    if not split_steps:
        return [_respaced(diffusion, steps)] * num_ar_steps
    if isinstance(steps, str) and steps.isdigit():
        steps = int(steps)
    if not isinstance(steps, int):
        raise GenerationError(f"split_steps needs an int number of diffusion steps, got {steps!r}")
    if steps < 2 * num_ar_steps:
        raise GenerationError(f"split_steps: {steps} diffusion steps leave fewer than 2 to some of "
                              f"the {num_ar_steps} AR steps; give at least {2 * num_ar_steps}")
    counts = equal_split(steps, num_ar_steps).tolist()
    by_count = {count: _respaced(diffusion, count) for count in set(counts)}
    return [by_count[count] for count in counts]


def _respaced(diffusion, steps):
    try:
        return respaced(diffusion, steps)
    except ValueError as error:
        raise GenerationError(str(error)) from None


def keep_mask(keep, grid: tuple[int, int]) -> torch.Tensor:
    """Raster ``(L,)`` bool of the kept tokens from a bool ``(h, w)`` grid or a region name:
    ``centre`` (the middle half of each side), ``top`` or ``bottom`` (half of the rows)."""
    h, w = grid
    if isinstance(keep, str):
        if keep not in KEEP_REGIONS:
            raise GenerationError(f"unknown keep region {keep!r}; allowed: {', '.join(KEEP_REGIONS)}")
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        regions = {
            "centre": (rows >= h // 4) & (rows < h // 4 + h // 2)
            & (cols >= w // 4) & (cols < w // 4 + w // 2),
            "top": rows < h // 2,
            "bottom": rows >= h // 2,
        }
        keep = regions[keep]
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.shape != (h, w):
        raise GenerationError(f"keep mask must be a bool ({h}, {w}) grid, got shape {tuple(keep.shape)}")
    return keep.reshape(-1)


@torch.no_grad()
def generate(model: CausalTransformer, diffusion, labels, options: SamplingOptions | None = None, *,
             prediction: str = "eps", generator: Generators = None,
             progress: Progress | None = None, **fields) -> Generated:
    """Class-conditional generation of ``len(labels)`` images' tokens with the
    ``SamplingOptions`` ``options`` (any of its fields may also be given as keywords).

    ``diffusion`` is the model's (unrespaced) diffusion, respaced to ``options.steps`` for
    each AR step; ``prediction`` the network's parameterisation; ``generator`` draws the
    orders, step sizes and noise: one for the batch, or ``SampleGenerators`` (one per image).
    """
    options = SamplingOptions.of(options, **fields)
    return _from_noise(model, diffusion, check_labels(model, labels), options, prediction, generator,
                       progress)


@torch.no_grad()
def text_to_image(model, diffusion, text, options: SamplingOptions | None = None, *,
                  prediction: str = "eps", generator: Generators = None,
                  progress: Progress | None = None, **fields) -> Generated:
    """Text-to-image generation with a ``cfkit.multimodal.MultimodalTransformer``: framed
    caption ids ``text`` ``(N, max_text_len)`` (e.g. ``method.frame(captions)``) go into the KV cache before
    the image, and CFG's unconditional branch is the null caption. Options as ``generate``'s
    (always KV-cached)."""
    if not can(model, TEXT_CONDITIONING):
        raise GenerationError(f"{type(model).__name__} is not text-conditioned: give class labels")
    try:
        text = model.check_text(text)
    except ValueError as error:
        raise GenerationError(str(error)) from None
    options = SamplingOptions.of(options, **{**fields, "cached": True})
    return _from_noise(model, diffusion, text, options, prediction, generator, progress)


def _from_noise(model, diffusion, condition, options: SamplingOptions, prediction, generator,
                progress) -> Generated:
    """Every token generated for the checked ``condition`` (class labels or caption ids)."""
    guidance = guidance_for(model, options.cfg, options.cfg_interval)
    config = model.config
    device = model.patch_embed.weight.device
    order = generation_order(options.order, len(condition), config.grid, generator).to(device)
    sizes = ar_step_sizes(config.num_tokens, options.ar_steps, options.step_sizes, options.schedule,
                          generator)
    given = torch.zeros(len(condition), 0, config.token_dim, device=device,
                        dtype=model.patch_embed.weight.dtype)
    return _generate(model, diffusion, condition.to(device), order, given, sizes, guidance, options,
                     prediction, generator, progress)


@torch.no_grad()
def edit(model: CausalTransformer, diffusion, image_latents: torch.Tensor, keep, labels,
         options: SamplingOptions | None = None, *, prediction: str = "eps",
         generator: Generators = None, progress: Progress | None = None,
         **fields) -> Generated:
    """Zero-shot editing: the ``keep`` tokens of ``image_latents`` ``(N, C, H, W)`` (a bool
    ``(h, w)`` grid or one of ``KEEP_REGIONS``) are the first AR step's clean context; the
    others are generated in ``order`` after them, for the (new) class ``labels``. The AR
    steps (``ar_steps``, ``step_sizes`` or ``schedule``) split the generated tokens only;
    the other options are those of ``generate``."""
    options = SamplingOptions.of(options, **fields)
    config = model.config
    expected = (config.latent_channels, config.input_size, config.input_size)
    if image_latents.dim() != 4 or tuple(image_latents.shape[1:]) != expected:
        raise GenerationError(f"image latents must be (N, {', '.join(map(str, expected))}), "
                              f"got {tuple(image_latents.shape)}")
    weight = model.patch_embed.weight
    n = image_latents.shape[0]
    labels = check_labels(model, labels)
    labels = labels.expand(n) if labels.numel() == 1 else labels
    if labels.numel() != n:
        raise GenerationError(f"give one class or one per image ({n}), got {labels.numel()}")
    guidance = guidance_for(model, options.cfg, options.cfg_interval)
    kept = keep_mask(keep, config.grid).to(weight.device)
    free = generation_order(options.order, n, config.grid, generator).to(weight.device)
    free = free[~kept[free]].reshape(n, -1)  # the ordering's order of the tokens to generate
    order = torch.cat([kept.nonzero()[:, 0].expand(n, -1), free], dim=1)
    tokens = patchify(image_latents.to(weight), config.patch_size)
    num_kept = int(kept.sum())
    given = torch.gather(tokens, 1, order[:, :num_kept, None].expand(-1, -1, tokens.shape[-1]))
    if num_kept == config.num_tokens:
        return Generated(tokens, order, torch.zeros(0, dtype=torch.long), config.patch_size,
                         config.latent_channels)
    sizes = ar_step_sizes(free.shape[1], options.ar_steps, options.step_sizes, options.schedule, generator)
    return _generate(model, diffusion, labels.to(weight.device), order, given, sizes, guidance,
                     options, prediction, generator, progress)


def _generate(model, diffusion, labels, order, given, sizes, guidance, options: SamplingOptions,
              prediction, generator, progress) -> Generated:
    """Generate the AR steps ``sizes`` after the ``given`` clean tokens ``(N, K, d)`` at the
    first K positions of ``order``; returns every token in raster order."""
    sampler = options.built_sampler()
    diffusions = step_diffusions(diffusion, options.steps, len(sizes), options.split_steps)
    num_given = given.shape[1]
    if denoises_whole_image(model):
        if len(sizes) > 1 or num_given:
            raise GenerationError(
                f"{type(model).__name__} denoises every token at once (no causal mask): it "
                f"generates in 1 AR step from nothing given, got {len(sizes)} AR steps and "
                f"{num_given} given tokens (editing needs a causal model)")
        context = WholeImageContext(model, labels, order, guidance)
    elif options.cached:
        context = CachedContext(model, labels, order, guidance)
    else:
        all_sizes = torch.cat([torch.tensor([num_given]), sizes]) if num_given else sizes
        context = RecomputedContext(model, labels, order, all_sizes, guidance)
    if num_given:
        context.add(given, slice(0, num_given))
    total, done = sum(d.num_timesteps for d in diffusions), 0

    def on_step():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    pieces, start = [given], num_given
    weight = model.patch_embed.weight
    precision = network_precision(model, options.precision)
    for s, (size, step_diffusion) in enumerate(zip(sizes.tolist(), diffusions, strict=True)):
        span = slice(start, start + size)
        x = noise_like(torch.empty(len(labels), size, given.shape[-1], device=weight.device,
                                   dtype=weight.dtype), generator)
        with precision.autocast(weight.device):  # the network's matmuls; the sampler's maths stays fp32
            x = reverse_process(lambda x_t, t, span=span: context.predict(x_t, span, t).to(x_t.dtype),
                                step_diffusion, sampler, x, prediction, generator, on_step)
            if s < len(sizes) - 1:  # the last step's tokens are context for nothing
                context.add(x, span)
        pieces.append(x)
        start += size
    ordered = torch.cat(pieces, dim=1)
    tokens = torch.empty_like(ordered).scatter(1, order[..., None].expand_as(ordered), ordered)
    return Generated(tokens, order, sizes, model.config.patch_size, model.config.latent_channels,
                     precision)
