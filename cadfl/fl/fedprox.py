"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term (mu/2)||w - w_global||^2 in each
device's loss, which limits how far a device drifts from the global model on skewed data."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..checks import check_range
from .fedavg import FedAvg
from .payload import TrainConfig
from .registry import register


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
        if mu < 0:
            raise ValueError(f"fedprox mu must be >= 0, got {mu}")
        self.mu = mu

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """FedAvg's settings with the proximal strength set."""
        return replace(super().device_config(rnd, device), mu=self.mu)
