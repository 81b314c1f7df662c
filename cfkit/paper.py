"""The shape of a paper's numbers as ``cfkit bench`` reports them next to its own: a table's
columns are ``(metric plugin, S_eval)`` pairs (``S_eval`` None for a metric of the model, not
of samples) and its rows are keyed by the bench variant that reproduces them. Plugins register
the tables (``register_paper_tables``); a bench grid names one by its key (``table``)."""

from __future__ import annotations

from dataclasses import dataclass

from cfkit import plugins


@dataclass(frozen=True)
class PaperTable:
    title: str
    columns: tuple[tuple[str, int | None], ...]
    rows: dict[str, tuple[float, ...]]
    note: str = ""


def table_keys() -> list[str]:
    """The registered tables' keys, in the order their plugins register them."""
    return [c.name for c in plugins.registry().components() if c.kind == "paper_tables"]


def table(key: str) -> PaperTable:
    """The registered table ``key``; an UnknownComponentError lists the known keys."""
    return plugins.build("paper_tables", key)
