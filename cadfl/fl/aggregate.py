"""Aggregation, the one function every algorithm uses: a weighted average over holders.

Each device contributes tensors placed into the global state, whole or by index maps (those of
a sub-model): a set of rows (dim 0) and, for width-scaled sub-models, a set of columns (dim 1,
the input channels), with a weight per row. Every global coordinate becomes the weighted mean of
the devices that hold it, accumulated in float64 in the order given; coordinates no device held
keep their value. The mean is folded in as contributions arrive (`RunningMean`): a round holds the
float64 sums and one update at a time, however many devices take part. The robust rules
(median, trimmed mean) need every holder's value of a coordinate at once, so they hold all of
the round's contributions.

FedAvg is the case "every device holds every row with weight = its sample count"; CAD's
path-paired averaging is the case "class c's rows are held by the devices of class c,
weighted by their class-c counts"; HeteroFL's is "a device holds the rows and columns of the
channels its width keeps".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .payload import State

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def is_bn_stat(key: str) -> bool:
    """Whether a state key is a batch-norm running statistic (a buffer, not a weight)."""
    return key.rsplit(".", 1)[-1] in BN_STATS


@dataclass
class Contribution:
    """One device's tensors, keyed by global name.

    `rows[key]` gives the global rows (dim 0) a sliced tensor fills and `cols[key]` its global
    columns (dim 1); a key absent from `rows` (`cols`) fills every row (column).
    `row_weights[key]` overrides the scalar `weight` per row of the device's tensor.
    """

    state: State
    weight: float
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    row_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    cols: dict[str, torch.Tensor] = field(default_factory=dict)

    def index(self, key: str, like: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Where tensor `key` sits in the global tensor `like`: an index tuple that selects
        its coordinates (rows, or rows x columns), or None for the whole tensor."""
        rows, cols = self.rows.get(key), self.cols.get(key)
        if cols is None:
            return None if rows is None else (rows,)
        rows = torch.arange(like.shape[0]) if rows is None else rows
        return rows[:, None], cols[None, :]


def _rows_of(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() else 1


def _per_row(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Row weights shaped to broadcast over a tensor of `dim` dimensions (0-dim: a scalar)."""
    return w.reshape((-1, *[1] * (dim - 1)) if dim else ())


RULES = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True)
class Robustness:
    """How to combine the holders of a row: their weighted `mean` (the default), or, against
    hostile devices, their coordinate-wise `median` or `trimmed_mean` (dropping the `trim`
    share of the lowest and of the highest values); `clip` > 0 first scales down every
    device's update (its weights minus the global ones) to at most that L2 norm."""

    rule: str = "mean"
    trim: float = 0.1
    clip: float = 0.0


MEAN = Robustness()

def aggregate(state: State, contributions: Iterable[Contribution],
              robust: Robustness = MEAN) -> State:
    """Combine `contributions` into a new state (the input is not modified): a weighted mean
    over the holders of each row, folded in one contribution at a time, or a robust statistic
    over them (see `Robustness`), which needs them all at once."""
    if robust.rule not in RULES:
        raise ValueError(f"unknown aggregation rule {robust.rule!r}; valid: {', '.join(RULES)}")

    def checked() -> Iterable[Contribution]:
        for c in contributions:
            for key, t in c.state.items():
                _check_shape(state, c, key, t)
            yield clip_update(state, c, robust.clip) if robust.clip > 0 else c

    if robust.rule == "mean":
        running = RunningMean(state)
        for c in checked():
            running.add(c)
        return running.result()
    return _order_statistic(state, list(checked()), robust)


def _check_shape(state: State, c: Contribution, key: str, t: torch.Tensor) -> None:
    g = state[key]
    index = c.index(key, g)
    expected = g.shape if index is None else g[index].shape
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{key}: got shape {tuple(t.shape)}, expected {tuple(expected)}")


def _row_weights(c: Contribution, key: str, t: torch.Tensor) -> torch.Tensor:
    w = c.row_weights.get(key)
    return (torch.full((_rows_of(t),), float(c.weight), dtype=torch.float64) if w is None
            else w.to(torch.float64))


def clip_update(state: State, c: Contribution, max_norm: float) -> Contribution:
    """The contribution with its update (weights minus global weights, batch-norm statistics
    left out) scaled down to L2 norm `max_norm` if it is longer."""
    deltas = {}
    for key, t in c.state.items():
        if t.is_floating_point() and not is_bn_stat(key):
            index = c.index(key, state[key])
            g = state[key] if index is None else state[key][index]
            deltas[key] = (t.to(torch.float64) - g.to(torch.float64), g)
    norm = float(sum((d ** 2).sum() for d, _ in deltas.values())) ** 0.5
    if norm <= max_norm:
        return c
    scale = max_norm / norm
    clipped = dict(c.state)
    for key, (d, g) in deltas.items():
        clipped[key] = (g.to(torch.float64) + d * scale).to(c.state[key].dtype)
    return Contribution(clipped, c.weight, c.rows, c.row_weights, c.cols)


def _order_statistic(state: State, contributions: Sequence[Contribution],
                     robust: Robustness) -> State:
    """Coordinate-wise median or trimmed mean over the holders of each row (unweighted)."""
    out = dict(state)
    for key in dict.fromkeys(k for c in contributions for k in c.state):
        g = state[key]
        stack = torch.full((len(contributions), *g.shape), float("nan"), dtype=torch.float64)
        for i, c in enumerate(contributions):
            if key not in c.state:
                continue
            t = c.state[key].to(torch.float64)
            held = _row_weights(c, key, t) > 0
            if g.dim() == 0:
                if held.all():
                    stack[i] = t
                continue
            index = c.index(key, g) or (torch.arange(_rows_of(g)),)
            stack[i][(index[0][held], *index[1:])] = t[held]
        valid = ~torch.isnan(stack)
        count = valid.sum(0)
        if robust.rule == "median":
            value = torch.nanmedian(stack, dim=0).values
        else:
            ordered = torch.where(valid, stack, torch.inf).sort(dim=0).values
            lo = torch.floor(robust.trim * count)
            index = torch.arange(len(contributions), dtype=torch.float64).view(
                -1, *[1] * g.dim())
            keep = (index >= lo) & (index < count - lo)
            value = torch.where(keep, ordered, 0.0).sum(0) / keep.sum(0).clamp_min(1)
        value = torch.where(count > 0, value, g.to(torch.float64))
        out[key] = (value.round() if not g.is_floating_point() else value).to(g.dtype)
    return out


class RunningMean:
    """Float64 running sums of weighted contributions over the holders of each coordinate.

    The total weight is kept per row, or per (row, column) once a contribution places columns:
    only then do holders differ along dim 1, and a full-size weight tensor for every key would
    double the memory of FedAvg's linear layers.
    """

    def __init__(self, state: State) -> None:
        self.state = state
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def add(self, c: Contribution) -> None:
        """Fold one contribution into the sums."""
        for key, t in c.state.items():
            g = self.state[key]
            w = _row_weights(c, key, t)
            if key not in self.sums:
                self.sums[key] = torch.zeros(g.shape, dtype=torch.float64)
                self.weights[key] = torch.zeros(_rows_of(g), dtype=torch.float64)
            if key in c.cols and self.weights[key].dim() == 1:
                self.weights[key] = self.weights[key][:, None].repeat(1, g.shape[1])
            weighted = t.to(torch.float64) * _per_row(w, t.dim())
            index = c.index(key, g)
            # A device's weight for each coordinate of its weight tensor: its row's weight.
            w = w if self.weights[key].dim() == 1 else w[:, None].expand(-1, t.shape[1])
            if index is None:
                self.sums[key] += weighted
                self.weights[key] += w
            else:
                # Within one contribution every coordinate is placed once, so accumulate=True
                # only adds to the running sums.
                self.sums[key].index_put_(index, weighted, accumulate=True)
                self.weights[key].index_put_(index, w, accumulate=True)

    def result(self) -> State:
        """The weighted means (coordinates nobody held keep the state's value)."""
        out = dict(self.state)
        for key, s in self.sums.items():
            g, w = self.state[key], self.weights[key]
            w = w.reshape(*w.shape, *[1] * (g.dim() - w.dim())) if g.dim() else w.reshape(())
            mean = torch.where(w > 0, s / w.clamp_min(1e-300), g.to(torch.float64))
            out[key] = (mean.round() if not g.is_floating_point() else mean).to(g.dtype)
        return out
