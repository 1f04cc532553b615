"""The registry of algorithms, like timm's `register_model`: a strategy class registers itself
by name, with the settings it takes (its `Options` dataclass, the config's `[NAME]` table).

Adding an algorithm is one new file in `cadfl/fl/` with `@register` on its class, and one
import line in `cadfl/fl/__init__.py`; the engine and the config validator find it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .strategy import Strategy

ALGORITHMS: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound="type[Strategy]")


def register(cls: S) -> S:
    """Class decorator: make a strategy available under its `name`."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} is registered twice")
    ALGORITHMS[cls.name] = cls
    return cls
