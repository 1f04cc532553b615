"""Local objectives: the terms algorithms add to a device's cross-entropy, found by name.

An algorithm's own file registers its term with `@local_objective("NAME")` and names it in
its devices' `TrainConfig.objective`, with its arguments in `TrainConfig.objective_args`. The
one training loop (`cadfl.device.train`) adds `penalty(params, anchor, **args)` to the loss
of every step, `anchor` being the model the device received: it knows no objective itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checks import check_one_of

# penalty(params, anchor, **args): the scalar added to the cross-entropy; params are the
# parameters being trained by state-dict name, anchor the received tensors of those names,
# on the same compute device.
Penalty = Callable[..., torch.Tensor]
# add_gradient(grads, params, anchors, **args): adds the penalty's gradient to `grads` in
# place, on stacked tensors (a leading device dimension, `cadfl.device.batched`).
AddGradient = Callable[..., None]


@dataclass(frozen=True)
class LocalObjective:
    """A registered local objective: its `penalty`, and optionally `add_gradient`, the same
    gradient written element by element for batched training (without it, payloads with this
    objective train one device at a time)."""

    penalty: Penalty
    add_gradient: AddGradient | None = None


LOCAL_OBJECTIVES: dict[str, LocalObjective] = {}


def local_objective(name: str, add_gradient: AddGradient | None = None
                    ) -> Callable[[Penalty], Penalty]:
    """Function decorator: register the penalty as the local objective `name` (with its
    batched gradient `add_gradient`, if it has one)."""

    def register(penalty: Penalty) -> Penalty:
        if name in LOCAL_OBJECTIVES:
            raise ValueError(f"local objective {name!r} is registered twice")
        LOCAL_OBJECTIVES[name] = LocalObjective(penalty, add_gradient)
        return penalty

    return register


def objective_of(name: str) -> LocalObjective:
    """The local objective registered as `name` (ValueError listing the valid ones)."""
    check_one_of("objective", name, LOCAL_OBJECTIVES)
    return LOCAL_OBJECTIVES[name]
