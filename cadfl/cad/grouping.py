"""Class groups for CAD: which classes share a path when there are fewer paths than classes.

A device receives the paths of the groups its classes are in, so a group should hold classes
that devices hold together: then a context maps to few, wider paths. The cloud knows which
classes each device holds (the counts devices report), so it can group by co-occurrence
without any data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .decouple import even_groups

GROUPINGS = ("cooccur", "even")


def cooccurrence(class_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """(K, K) counts of the devices holding both class i and class j (zero diagonal)."""
    co = np.zeros((num_classes, num_classes), dtype=np.int64)
    for classes in class_sets:
        held = np.zeros(num_classes, dtype=bool)
        held[list(classes)] = True
        co += np.outer(held, held)
    np.fill_diagonal(co, 0)
    return co


def class_groups(class_sets: Sequence[Sequence[int]], num_classes: int, groups: int,
                 how: str = "cooccur") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The class order and the classes per group (`even_groups` sizes) of `groups` groups.

    "even": consecutive class ids. "cooccur": greedy, group after group: the first class is
    the one held together with the most others still ungrouped; each next one is the
    ungrouped class held together most often with the group's classes (ties: lowest id).
    Within a group the classes are ascending."""
    sizes = even_groups(num_classes, groups)
    if how == "even":
        return tuple(range(num_classes)), sizes
    if how != "cooccur":
        raise ValueError(f"unknown grouping {how!r}; valid: {', '.join(GROUPINGS)}")
    co = cooccurrence(class_sets, num_classes)
    left = list(range(num_classes))
    order: list[int] = []
    for size in sizes:
        first = max(left, key=lambda c: (co[c, left].sum(), -c))
        group = [first]
        left.remove(first)
        while len(group) < size:
            best = max(left, key=lambda c: (co[c, group].sum(), -c))
            group.append(best)
            left.remove(best)
        order += sorted(group)
    return tuple(order), sizes
