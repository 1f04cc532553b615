"""The registry of algorithms, like timm's `register_model`: a strategy class registers itself
by name, with the settings it takes (its `Options` dataclass, the config's `[NAME]` table).

Adding an algorithm is one new file in `cadfl/fl/` with `@register` on its class, and one
import line in `cadfl/fl/__init__.py`; the engine and the config validator find it here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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


def check_range(name: str, value: float, low: float, high: float | None = None,
                low_open: bool = False) -> None:
    """ValueError naming `name` and the allowed range unless low <= value <= high (or
    low < value with `low_open`)."""
    bad = value <= low if low_open else value < low
    if bad or (high is not None and value > high) or not math.isfinite(value):  # nan, inf
        left = "(" if low_open else "["
        right = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name}: {value!r} is out of range, allowed {left}{low}, {right}")


def check_one_of(name: str, value: str, valid: Iterable[str]) -> None:
    """ValueError naming `name` and the valid values unless `value` is one of them."""
    valid = list(valid)
    if value not in valid:
        raise ValueError(f"{name}: unknown {value!r}; valid: {', '.join(valid)}")
