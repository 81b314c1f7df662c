"""Plugin discovery, the component registry and the config defaults.

Plugins are modules listed in the ``cfkit`` entry-point group; the built-ins in ``plugins/``
are listed there by cfkit's own package metadata, and set the config defaults that name their
components, so the core never names them.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import pluggy

from cfkit import hookspecs

ENTRY_POINT_GROUP = "cfkit"


class UnknownComponentError(KeyError):
    """A component name that no plugin registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class NoDefaultError(UnknownComponentError):
    """A config key that no plugin sets a default for (``register_defaults``): it is required."""


class DuplicateComponentError(Exception):
    """Two plugins registered one name for one kind, or set one default: an installation
    problem, so not a ValueError that a config check would report as a bad field."""


@dataclass(frozen=True)
class Registration:
    """One registered component: its ``kind`` and ``name``, the ``factory`` that builds it and
    the plugin (``provider``) that registered it. A config names one with
    ``cfkit.config.Component`` (kind, name, options)."""

    kind: str
    name: str
    factory: Callable[..., Any]
    provider: str


@dataclass(frozen=True)
class Default:
    """The default ``value`` of the config key path ``key`` (e.g. ``"sampling.order"``)."""

    key: str
    value: Any
    provider: str


class Registry:
    """Every registered component, by kind and name, and every config default, by key. A name
    registered again or a key set again (``conflicts``, ``default_conflicts``: the later ones,
    unused) is a DuplicateComponentError unless ``allow_conflicts``."""

    def __init__(self, manager: pluggy.PluginManager, allow_conflicts: bool = False):
        self.manager = manager
        self._components: dict[str, dict[str, Registration]] = {kind: {} for kind in hookspecs.KINDS}
        self._defaults: dict[str, Default] = {}
        self.conflicts: list[Registration] = []
        self.default_conflicts: list[Default] = []
        for kind in hookspecs.KINDS:
            self._collect(f"register_{kind}", functools.partial(self._add, kind))
        self._collect("register_defaults", self._set_default)
        if not allow_conflicts:
            self.check_conflicts()

    def _collect(self, hook: str, add: Callable[..., None]) -> None:
        """Call every plugin's ``hook`` with a ``register`` that passes its plugin name to ``add``."""
        for impl in getattr(self.manager.hook, hook).get_hookimpls():  # registration order
            impl.function(register=functools.partial(add, impl.plugin_name))

    def _add(self, kind: str, provider: str, name: str, factory: Callable[..., Any]) -> None:
        known = self._components[kind]
        if name in known:
            self.conflicts.append(Registration(kind, name, factory, provider))
        else:
            known[name] = Registration(kind, name, factory, provider)

    def _set_default(self, provider: str, key: str, value: Any) -> None:
        if key in self._defaults:
            self.default_conflicts.append(Default(key, value, provider))
        else:
            self._defaults[key] = Default(key, value, provider)

    @property
    def clashing(self) -> bool:
        """Whether two plugins register one name or set one default."""
        return bool(self.conflicts or self.default_conflicts)

    def check_conflicts(self) -> None:
        """A DuplicateComponentError (``conflict_message``) when two plugins clash."""
        if self.clashing:
            raise DuplicateComponentError(self.conflict_message())

    def conflict_message(self) -> str:
        """One line: the first clash (of a component, else of a default), its two plugins and
        the fix."""
        if self.conflicts:
            later = self.conflicts[0]
            first = self._components[later.kind][later.name]
            what, rename = f"{later.kind} name {later.name!r}", "rename the component in one of them"
        else:
            later = self.default_conflicts[0]
            first = self._defaults[later.key]
            what, rename = f"the default of {later.key!r}", "drop the default from one of them"
        dists = sorted({p.split(":")[0] for p in (first.provider, later.provider) if ":" in p} - {"cfkit"})
        fix = f"pip uninstall {' or '.join(dists)}" if dists else "remove one of the two plugins"
        more = len(self.conflicts) + len(self.default_conflicts) - 1
        return (f"{what} is registered twice: by {first.provider!r} and "
                f"by {later.provider!r}; {fix}, or {rename}"
                + (f" ({more} more clash{'es' if more > 1 else ''})" if more else "")
                + "; `cfkit plugins` lists every component")

    def default(self, key: str) -> Any:
        """The default a plugin sets for the config key path ``key`` (a copy, free to change);
        a NoDefaultError, naming the key, when none does."""
        if key not in self._defaults:
            raise NoDefaultError(f"{key}: required, as no installed plugin sets a default for it "
                                 "(register_defaults); give a value")
        return copy.deepcopy(self._defaults[key].value)

    def defaults(self) -> list[Default]:
        """Every config default, in registration order."""
        return list(self._defaults.values())

    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def component(self, kind: str, name: str) -> Registration:
        known = self._kind(kind)
        if name not in known:
            raise UnknownComponentError(
                f"unknown {kind} name {name!r}; known: {', '.join(sorted(known)) or '(none)'}"
            )
        return known[name]

    def build(self, kind: str, name: str, **options: Any) -> Any:
        """The component ``name`` of ``kind``, built from its options; an unknown or missing
        option is a ValueError listing the allowed ones."""
        factory = self.component(kind, name).factory
        check_options(f"{kind} {name!r}", factory, options)
        return factory(**options)

    def components(self) -> list[Registration]:
        return [c for kind in hookspecs.KINDS for c in self._components[kind].values()]

    def _kind(self, kind: str) -> dict[str, Registration]:
        if kind not in self._components:
            raise UnknownComponentError(
                f"unknown component kind {kind!r}; known: {', '.join(hookspecs.KINDS)}"
            )
        return self._components[kind]


def check_options(what: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise a ValueError naming the options ``factory`` does not take (or lacks) and the
    ones it takes; a factory taking ``**kwargs`` or without a signature is not checked."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    allowed = ", ".join(p.name for p in named) or "(none)"
    unknown = [key for key in options if key not in {p.name for p in named}]
    if unknown:
        raise ValueError(f"{what} has no option {', '.join(map(repr, unknown))}; allowed: {allowed}")
    missing = [p.name for p in named if p.default is p.empty and p.name not in options]
    if missing:
        raise ValueError(f"{what} needs option {', '.join(map(repr, missing))}; allowed: {allowed}")


class OptionError(ValueError):
    """Options of the wrong type or out of range; each line names ``section.field``, the value
    and what is allowed."""


def typed(cls: type, options: dict[str, Any], section: str):
    """``cls(**options)`` for a dataclass whose field annotations are its allowed values
    (``Annotated[int, Ge(1)]``, ``Literal[...]``): strictly typed (an int is not a bool nor a
    string), finite and in range, else an OptionError."""
    from pydantic import ValidationError

    try:
        checked = _checker(cls).model_validate(options)
    except ValidationError as error:
        hints = get_type_hints(cls, include_extras=True)
        raise OptionError("\n".join(_problem(item, hints, section) for item in error.errors())) from None
    return cls(**dict(checked))


def _problem(item: dict, hints: dict, section: str) -> str:
    """One line of an OptionError, from one pydantic error ``item`` of a field of ``hints``."""
    field = item["loc"][0]
    if field not in hints:
        return f"{section}.{field}: unknown option; allowed: {', '.join(hints)}"
    return f"{section}.{field}: got {item['input']!r}; allowed: {_allowed(hints[field])}"


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}  # annotated_types' names


def _allowed(annotation) -> str:
    """A field annotation in words: ``Annotated[int, Ge(1)]`` -> "an integer >= 1"."""
    base, *limits = get_args(annotation) if get_origin(annotation) is Annotated else (annotation,)
    if get_origin(base) is Literal:
        return ", ".join(map(str, get_args(base)))
    kinds = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    bounds = [f"{symbol} {getattr(limit, name)}" for limit in limits
              for name, symbol in _BOUNDS.items() if getattr(limit, name, None) is not None]
    return " ".join([kinds.get(base, str(base)), " and ".join(bounds)]).strip()


@functools.cache
def _checker(cls: type):
    """A strict pydantic model of the dataclass ``cls``'s fields (checks only, never built)."""
    from pydantic import ConfigDict, create_model

    hints = get_type_hints(cls, include_extras=True)
    options = {f.name: (hints[f.name], f.default) for f in fields(cls)}
    config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    return create_model(f"{cls.__name__}Options", __config__=config, **options)


def plugin_manager(extra_plugins: tuple[Any, ...] = ()) -> pluggy.PluginManager:
    """A plugin manager with every entry-point plugin and then ``extra_plugins``."""
    manager = pluggy.PluginManager("cfkit")
    manager.add_hookspecs(hookspecs)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name, e.name)):
        name = f"{ep.dist.name}:{ep.name}"
        if manager.get_plugin(name) is None:
            manager.register(ep.load(), name=name)
    for plugin in extra_plugins:
        manager.register(plugin, name=getattr(plugin, "__name__", None))
    return manager


def registry(allow_conflicts: bool = False) -> Registry:
    """The process-wide registry of installed plugins (built once); a DuplicateComponentError
    when two of them register one name, unless ``allow_conflicts`` (to list them)."""
    installed = _installed()
    if not allow_conflicts:
        installed.check_conflicts()
    return installed


@functools.cache
def _installed() -> Registry:
    return Registry(plugin_manager(), allow_conflicts=True)


def build(kind: str, name: str, **options: Any) -> Any:
    """Shorthand for ``registry().build(kind, name, **options)``."""
    return registry().build(kind, name, **options)


def default(key: str) -> Any:
    """Shorthand for ``registry().default(key)``: the default a plugin sets for a config key
    path, read when a config or an options object is built, never at import."""
    return registry().default(key)


def add_commands(subparsers) -> None:
    """Let every installed plugin add its ``cfkit`` subcommands (the ``register_commands`` hook)
    to the argparse ``subparsers``."""
    _installed().manager.hook.register_commands(subparsers=subparsers)
