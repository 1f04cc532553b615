"""Ditto (Li et al., ICML 2021): fair and robust federated learning through personalisation.

Every participant trains the global model as FedAvg does (and the cloud averages it), and,
beside it, its own personal model v with the proximal term (lambda/2)||v - w||^2 towards the
global model w it received (FedProx's local objective, `cadfl.fl.fedprox`). The personal
model stays on the device (from the received model the first time); it is what the device
predicts with, so Ditto is judged by context accuracy, and its global model by global
accuracy. A device trains two models: twice the FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..checks import check_range
from ..models import ModelSpec
from .fedavg import FedAvg
from .payload import PERSONAL, Payload, State, TrainConfig
from .registry import register

PERSONAL_KEYS = (f"{PERSONAL}*",)


@dataclass
class DittoOptions:
    """Ditto's settings (`[ditto]`)."""

    lam: float = 0.1  # strength of the pull of the personal model towards the global one

    def check(self, cfg: Any) -> None:
        """ValueError naming the field if a value is out of range."""
        check_range("ditto.lam", self.lam, 0, low_open=True)


@register
class Ditto(FedAvg):
    """FedAvg, plus a personal model per device regularised towards the global one."""

    name = "ditto"
    summary = "FedAvg plus a personal model per device pulled towards the global one (lam)"
    family = "personalised"
    judged_by = "both"
    context_from_global = False
    Options = DittoOptions

    def __init__(self, *args, lam: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lam = lam

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """The base settings with the personal model's proximal strength."""
        return replace(super().device_config(rnd, device), personal_lambda=self.lam)

    def payload(self, rnd: int, device: int, spec: ModelSpec, weights: State) -> Payload:
        """The global model; the device keeps its personal model to itself."""
        base = super().payload(rnd, device, spec, weights)
        return replace(base, keep=(*base.keep, *PERSONAL_KEYS), private=PERSONAL_KEYS)
