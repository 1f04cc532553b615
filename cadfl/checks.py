"""The range and choice checks that every setting's validation uses, one message format."""

from __future__ import annotations

import math
from collections.abc import Iterable


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
