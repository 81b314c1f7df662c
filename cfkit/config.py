"""Experiment configs: TOML files validated into typed pydantic models.

A component is written as a table with its registered ``name`` and its options, e.g.
``schedule = { name = "exp-decay", gamma = 0.9 }``. Names are checked against the plugin
registry and options by building the component, so a bad config fails when it is read.
Defaults that name a component come from the plugins (``register_defaults``), read when a
config is validated: a key no plugin sets a default for is required.
"""

from __future__ import annotations

import functools
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from cfkit import diffusion, plugins, weightings
from cfkit.methods import AR_PLANS, can
from cfkit.precision import PRECISIONS


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field."""


class Component(BaseModel):
    """A registered component: ``name`` plus its options (any other keys)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = Field("", exclude=True)  # set by the owning field's validator, not by users
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self):
        return plugins.build(self.kind, self.name, **self.options)


def _component(kind: str, axis: str | None = None, build: bool = True):
    """A before-validator checking a component's name (and its ``axis``) against the
    registry of ``kind`` and its options by building it (by their names only for a factory
    marked ``reads_files``, e.g. a VAE loading its weights)."""

    def check(value):
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict):
            value = Component(**{**value, "kind": kind})
        registry = plugins.registry()
        known = registry.names(kind)
        if axis is not None:
            known = [n for n in known if weightings.supports(registry.component(kind, n).factory, axis)]
        if value.name not in known:
            what = f"{axis}-axis weighting" if axis else f"{kind} name"
            raise ValueError(f"{value.name!r} is not a known {what}; allowed: {', '.join(known)}")
        factory = registry.component(kind, value.name).factory
        try:
            if build and getattr(factory, "reads_files", False):
                # weights need not exist where a config is written: only its options are checked
                plugins.check_options(f"{kind} {value.name!r}", factory, value.options)
            elif build:
                value.build()
        except (TypeError, ValueError) as error:
            raise ValueError(f"{value.name!r} with options {value.options}: {error}") from None
        return value

    return BeforeValidator(check)


def plugin_default(key: str):
    """A field default read from the plugins (``plugins.default(key)``) when a model is built
    without the field, never at import."""
    return Field(default_factory=functools.partial(plugins.default, key))


def registered_component(kind: str, key: str) -> Component:
    """The component of ``kind`` a plugin sets as the default of ``key``, as a name or a table
    ``{"name": ..., option: value}`` (not validated, like any default)."""
    value = plugins.default(key)
    return Component(**{**({"name": value} if isinstance(value, str) else value), "kind": kind})


def component_default(kind: str, key: str):
    """A component field's default: ``registered_component(kind, key)`` when a model is built
    without the field, never at import."""
    return Field(default_factory=functools.partial(registered_component, kind, key))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Factorisation(Strict):
    """How a batch is factorised: AR schedule, token order, loss weights, timesteps."""

    schedule: Annotated[Component, _component("schedules")] = component_default(
        "schedules", "factorisation.schedule")
    ordering: Annotated[Component, _component("orderings")] = component_default(
        "orderings", "factorisation.ordering")
    per_sample: bool = False
    ar_weighting: Annotated[Component, _component("weightings", "ar")] = component_default(
        "weightings", "factorisation.ar_weighting")
    diffusion_weighting: Annotated[Component, _component("weightings", "diffusion")] = component_default(
        "weightings", "factorisation.diffusion_weighting")
    timesteps: Annotated[Component, _component("timestep_samplers")] = component_default(
        "timestep_samplers", "factorisation.timesteps")
    copies: int = Field(1, ge=1)

    def planner(self):
        from cfkit.plan import Planner

        return Planner(
            self.schedule.build(), self.ordering.build(), self.timesteps.build(),
            copies=self.copies, per_sample=self.per_sample, ordering_name=self.ordering.name,
        )


class Diffusion(Strict):
    """The noise axis: β schedule, its length, the prediction target and respacing."""

    beta_schedule: Literal[diffusion.BETA_SCHEDULES] = "linear"
    num_timesteps: int = Field(1000, ge=2)
    prediction: Literal["eps", "x0", "v"] = "eps"

    @model_validator(mode="after")
    def _check_schedule(self):
        diffusion.beta_schedule(self.beta_schedule, self.num_timesteps)
        return self

    def build(self) -> diffusion.GaussianDiffusion:
        return diffusion.GaussianDiffusion.named(self.beta_schedule, self.num_timesteps)


IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")  # the image files the shard loader decodes
Suffix = Annotated[str, Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")]  # lower case: webdataset's


class SampleKeys(Strict):
    """Which files of a shard sample hold what, by webdataset suffix (``KEY.SUFFIX`` in the tar).
    The image is the first of ``images`` a sample has; the class label a ``label`` file (an
    integer as text), else the ``label_field`` of its ``json``; the captions a ``caption`` file
    (one caption), else the ``caption_field`` of its ``json`` (a caption or a list), else the
    ``json`` itself when it is a list of captions (the shards cfkit writes). The defaults read
    img2dataset (``jpg``, ``txt``, ``json``) and the ImageNet ``*-wds`` sets (``cls``)."""

    images: tuple[Literal[IMAGE_SUFFIXES], ...] = IMAGE_SUFFIXES
    label: Suffix = "cls"
    label_field: str = Field("label", min_length=1)
    caption: Suffix = "txt"
    caption_field: str = Field("caption", min_length=1)

    @model_validator(mode="after")
    def _check_distinct(self):
        if not self.images or len(set(self.images)) < len(self.images):
            raise ValueError(f"data.keys.images must list image suffixes once each (allowed: "
                             f"{', '.join(IMAGE_SUFFIXES)}), got {list(self.images)}")
        taken = {*self.images, "json", "latent.npy", "latent_flip.npy"}
        for name in ("label", "caption"):
            if getattr(self, name) in taken:
                raise ValueError(f"data.keys.{name} {getattr(self, name)!r} names a file that holds "
                                 f"something else; not one of: {', '.join(sorted(taken))}")
            taken.add(getattr(self, name))
        return self


class Data(Strict):
    """Training data: shards (or an embedded dataset built into cached shards on first use),
    the image tokenizer that maps images to latents and, for methods with text, the text
    tokenizer of the captions."""

    dataset: Annotated[Component, _component("datasets", build=False)] | None = None
    shards: str | None = None  # a folder, glob or brace pattern of train shards
    val_shards: str | None = None
    keys: SampleKeys = Field(default_factory=SampleKeys)  # which files hold image, label, captions
    tokenizer: Annotated[Component, _component("image_tokenizers")] = component_default(
        "image_tokenizers", "data.tokenizer")
    # captions -> ids, for methods with text (e.g. { name = "bytes" })
    text_tokenizer: Annotated[Component, _component("text_tokenizers")] | None = None
    encoded: bool = False  # shards hold pre-encoded latents (latent caching)
    flip: bool = True  # horizontal-flip augmentation
    shuffle_buffer: int = Field(1000, ge=1)
    num_workers: int = Field(0, ge=0)
    shard_size: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _check_source(self):
        if self.dataset is None and self.shards is None:
            raise ValueError("data: give a dataset ({ name = NAME }, see `cfkit plugins`) or shards")
        return self


Beta = Annotated[float, Field(ge=0, lt=1)]  # an Adam moment's decay
LR_SCHEDULES = ("constant", "cosine")  # the learning rate after the warmup (cfkit.train.lr_factor)


class Train(Strict):
    """The optimisation loop (reference defaults: AdamW β=(0.9, 0.95), eps 1e-15, wd 0,
    base LR 1e-4 per 256 images, linear warmup then constant, clip 1.0, EMA 0.9999)."""

    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)  # global batch
    base_lr: float = Field(1e-4, gt=0)  # per 256 images
    lr: float | None = Field(None, gt=0)  # absolute; overrides base_lr scaling
    warmup_steps: int = Field(0, ge=0)
    # after the warmup: "constant" (the reference) or "cosine" (a half cosine to 0 at max_steps)
    lr_schedule: Literal[LR_SCHEDULES] = "constant"
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: float = Field(1e-15, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema: float = Field(0.9999, ge=0, lt=1)
    # "auto": bf16 autocast where its matmuls are native and pay (cfkit.precision), else fp32
    precision: Literal[PRECISIONS] = "auto"
    grad_checkpoint: bool = False
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"
    ckpt_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    # batch_size is the optimizer step's: each process runs it in this many equal micro-batches
    grad_accum_steps: int = Field(1, ge=1)
    # fine-tuning: a cfkit checkpoint or run folder, or a .safetensors file, to take the weights
    # from (EMA when the checkpoint has them); the optimizer starts afresh
    init_from: str | None = None
    # keys of init_from's weights (a key, or a prefix ending at a "."-boundary) to leave at their
    # fresh initialisation, e.g. ["class_embedder"] for new classes
    init_skip: tuple[str, ...] = ()
    tensorboard: bool = False  # needs the tensorboard extra: pip install 'cfkit[tensorboard]'
    wandb: bool = False  # needs the wandb extra; WANDB_MODE=offline logs without an account
    wandb_project: str = "cfkit"

    @model_validator(mode="after")
    def _check_micro_batches(self):
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
                             f"{self.grad_accum_steps}; allowed: a divisor of batch_size")
        if self.init_skip and self.init_from is None:
            raise ValueError("init_skip names weights of init_from, which is not set; give "
                             "init_from = PATH or drop init_skip")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


def default_data() -> Data:
    """The data of an experiment that gives none: the dataset a plugin sets as ``data.dataset``
    (not validated, like any default)."""
    return Data.model_construct(dataset=registered_component("datasets", "data.dataset"))


class Experiment(Strict):
    """A whole experiment config."""

    name: str = "experiment"
    seed: int = 0
    method: Annotated[Component, _component("methods", build=False)] = component_default(
        "methods", "method")
    model: dict[str, Any] = {}
    # built when an experiment is: importing cfkit.config (as `cfkit --help` does) loads no plugin
    factorisation: Factorisation = Field(default_factory=Factorisation)
    diffusion: Diffusion = Field(default_factory=Diffusion)
    data: Data = Field(default_factory=default_data)
    train: Train = Field(default_factory=Train)

    @model_validator(mode="after")
    def _check_method(self):
        factory = plugins.registry().component("methods", self.method.name).factory
        check = getattr(factory, "check", None)
        if check is not None:
            try:
                check(self)
            except plugins.OptionError:
                raise  # its lines name their fields
            except (TypeError, ValueError) as error:
                raise ValueError(f"model: {error}") from None
        return self

    def network_config(self):
        """The method's network config (``.grid``, ``.cond_len``) without building weights."""
        factory = plugins.registry().component("methods", self.method.name).factory
        if not can(factory, AR_PLANS):
            raise ConfigError(f"method {self.method.name!r} does not factorise over AR steps")
        return factory.network_config(self)

    def build_method(self):
        """The configured method (network, loss) built from this experiment."""
        return plugins.build("methods", self.method.name, experiment=self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); value is a TOML literal or else a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. factorisation.copies=4), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {part!r} is not a table")
            node = child
        node[path[-1]] = value
    return data


def _fields_at(model: type[BaseModel], path) -> list[str]:
    """The field names of the (nested) model at ``path``, or [] when not a model."""
    for part in path:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def format_errors(error: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(model, item["loc"][:-1]))
            lines.append(f"{field}: unknown key (got {item.get('input')!r}); allowed keys: {allowed}")
        elif item["type"] in ("value_error", "assertion_error"):
            lines.append(message if not item["loc"] else f"{field}: {message}")
        else:
            lines.append(f"{field}: {message}; got {item.get('input')!r}")
    return "\n".join(lines)


def validate(data: dict, model: type[BaseModel] = Experiment):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(error, model)) from None
    except plugins.NoDefaultError as error:  # a required key, given no default by any plugin
        raise ConfigError(str(error)) from None


def load(path, overrides: list[str] = (), model: type[BaseModel] = Experiment):
    """Read, override and validate a TOML config; ConfigError says what is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give a TOML config file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error}); a config is a TOML file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return validate(apply_overrides(data, list(overrides)), model)


def dump(config: BaseModel) -> str:
    """The resolved config as TOML (defaults filled in)."""
    return _toml(config.model_dump(mode="json", exclude_none=True))


def _toml(data: dict, prefix: str = "") -> str:
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            tables.append((key, value))
        elif isinstance(value, dict):
            if "name" in value:  # a component: inline table
                scalars.append(f"{key} = {_inline(value)}")
            else:
                tables.append((key, value))
        else:
            scalars.append(f"{key} = {_literal(value)}")
    out = []
    if scalars:
        if prefix:
            out.append(f"[{prefix}]")
        out += scalars
        out.append("")
    for key, value in tables:
        out.append(_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out)


def _inline(value: dict) -> str:
    items = [f"{k} = {_literal(v)}" for k, v in value.items()]
    return "{ " + ", ".join(items) + " }"


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return _inline(value)
    raise TypeError(f"cannot write {value!r} as TOML")
