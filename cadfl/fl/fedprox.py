"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term (mu/2)||w - w_global||^2 in each
device's loss, which limits how far a device drifts from the global model on skewed data.

The term is the local objective "prox" (`cadfl.device.objective`), registered here; Ditto's
personal model is pulled towards the global one by the same term.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..checks import check_range
from ..device.objective import local_objective
from .fedavg import FedAvg
from .payload import State, TrainConfig
from .registry import register

PROX = "prox"


def _add_proximal_gradient(grads: list[torch.Tensor], params: list[torch.Tensor],
                           anchors: list[torch.Tensor], mu: float) -> None:
    """The proximal term's gradient mu * (w - anchor), added to `grads` (batched training)."""
    torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=mu)


@local_objective(PROX, add_gradient=_add_proximal_gradient)
def proximal_term(params: dict[str, nn.Parameter], anchor: State, mu: float) -> torch.Tensor:
    """(mu/2)||w - anchor||^2 over the trained parameters."""
    return mu / 2 * sum(((p - anchor[name]) ** 2).sum() for name, p in params.items())


@dataclass
class FedProxOptions:
    """FedProx's proximal strength (`[fedprox]`)."""

    mu: float = 0.01

    def check(self, cfg: Any) -> None:
        """ValueError naming the field if a value is out of range."""
        check_range("fedprox.mu", self.mu, 0)


@register
class FedProx(FedAvg):
    """FedAvg whose devices train with a proximal term of strength `mu`."""

    name = "fedprox"
    summary = "FedAvg with a proximal term (mu/2)||w - w_global||^2 on the devices"
    Options = FedProxOptions

    def __init__(self, *args, mu: float = 0.01, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mu = mu

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """FedAvg's settings with the proximal term of strength `mu` as local objective."""
        return replace(super().device_config(rnd, device), objective=PROX,
                       objective_args=(("mu", self.mu),))
