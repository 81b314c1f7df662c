"""Plugin discovery and the component registry.

Plugins are modules listed in the ``cfkit`` entry-point group; the built-ins in ``plugins/``
are listed there by cfkit's own package metadata, so the core never names them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from cfkit import hookspecs

ENTRY_POINT_GROUP = "cfkit"


class UnknownComponentError(KeyError):
    """A component name that no plugin registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateComponentError(ValueError):
    """Two plugins registered one name for one kind."""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    provider: str


class Registry:
    """Every registered component, by kind and name."""

    def __init__(self, manager: pluggy.PluginManager):
        self.manager = manager
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in hookspecs.KINDS}
        for kind in hookspecs.KINDS:
            hook = getattr(manager.hook, f"register_{kind}")
            for impl in hook.get_hookimpls():  # registration order
                impl.function(register=functools.partial(self._add, kind, impl.plugin_name))

    def _add(self, kind: str, provider: str, name: str, factory: Callable[..., Any]) -> None:
        known = self._components[kind]
        if name in known:
            raise DuplicateComponentError(
                f"{kind} name {name!r} is registered twice: by {known[name].provider!r} "
                f"and by {provider!r}"
            )
        known[name] = Component(kind, name, factory, provider)

    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def component(self, kind: str, name: str) -> Component:
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

    def components(self) -> list[Component]:
        return [c for kind in hookspecs.KINDS for c in self._components[kind].values()]

    def _kind(self, kind: str) -> dict[str, Component]:
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


@functools.cache
def registry() -> Registry:
    """The process-wide registry of installed plugins (built once)."""
    return Registry(plugin_manager())


def build(kind: str, name: str, **options: Any) -> Any:
    """Shorthand for ``registry().build(kind, name, **options)``."""
    return registry().build(kind, name, **options)
