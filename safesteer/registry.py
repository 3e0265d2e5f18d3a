"""Name-keyed registries (judges, measures): adding one whose name is taken is a mistake, said at once."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def register_new(registry: dict[str, T], name: str, item: T, what: str) -> T:
    """Add `item` under `name`, refusing a name already registered."""
    if name in registry:
        raise ValueError(f"a {what} named {name!r} is already registered")
    registry[name] = item
    return item
