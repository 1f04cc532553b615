"""Aggregation, the one function every algorithm uses: a weighted average over holders.

Each device contributes tensors placed into the global state, whole or as a set of rows (the
index map of a sub-model), with a weight per row. Every global row becomes the weighted mean of
the devices that hold it, accumulated in float64 in the order given; rows no device held keep
their value. FedAvg is the case "every device holds every row with weight = its sample count";
CAD's path-paired averaging is the case "class c's rows are held by the devices of class c,
weighted by their class-c counts".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .payload import State


@dataclass
class Contribution:
    """One device's tensors, keyed by global name.

    `rows[key]` gives the global rows (dim 0) a sliced tensor fills; keys absent from `rows` are
    whole tensors. `row_weights[key]` overrides the scalar `weight` per row.
    """

    state: State
    weight: float
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    row_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def _rows_of(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() else 1


def _per_row(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Row weights shaped to broadcast over a tensor of `dim` dimensions (0-dim: a scalar)."""
    return w.reshape((-1, *[1] * (dim - 1)) if dim else ())


def aggregate(state: State, contributions: Sequence[Contribution]) -> State:
    """Weighted average of `contributions` into a new state (the input is not modified)."""
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    for c in contributions:
        for key, t in c.state.items():
            g = state[key]
            rows = c.rows.get(key)
            expected = g.shape if rows is None else (len(rows), *g.shape[1:])
            if tuple(t.shape) != tuple(expected):
                raise ValueError(f"{key}: got shape {tuple(t.shape)}, expected {tuple(expected)}")
            n = _rows_of(t)
            w = c.row_weights.get(key)
            w = (torch.full((n,), float(c.weight), dtype=torch.float64) if w is None
                 else w.to(torch.float64))
            if key not in sums:
                sums[key] = torch.zeros(g.shape, dtype=torch.float64)
                weights[key] = torch.zeros(_rows_of(g), dtype=torch.float64)
            weighted = t.to(torch.float64) * _per_row(w, t.dim())
            if rows is None:
                sums[key] += weighted
                weights[key] += w
            else:
                sums[key].index_add_(0, rows, weighted)
                weights[key].index_add_(0, rows, w)
    out = dict(state)
    for key, s in sums.items():
        g = state[key]
        w = _per_row(weights[key], g.dim())
        mean = torch.where(w > 0, s / w.clamp_min(1e-300), g.to(torch.float64))
        out[key] = (mean.round() if not g.is_floating_point() else mean).to(g.dtype)
    return out
