"""FedRep (Collins et al., ICML 2021): learn a shared representation, personal heads.

As FedPer, the head is each device's own and only the body is averaged; but a device first
trains its head alone for `head_epochs` epochs (the body frozen), then the body alone for the
run's `train.epochs` (the head frozen), which is FedRep's alternating update.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..checks import check_range
from .fedper import FedPer
from .payload import TrainConfig
from .registry import register


@dataclass
class FedRepOptions:
    """FedRep's settings (`[fedrep]`)."""

    head_layers: int = 1  # the last N conv/linear layers are personal
    head_epochs: int = 5  # local epochs on the head before the body's

    def check(self, cfg: Any) -> None:
        """ValueError naming the field if a value is out of range."""
        check_range("fedrep.head_layers", self.head_layers, 1)
        check_range("fedrep.head_epochs", self.head_epochs, 1)


@register
class FedRep(FedPer):
    """FedPer whose devices train the head first, then the body."""

    name = "fedrep"
    summary = "shared body, personal head trained first (head_epochs), then the body"
    Options = FedRepOptions

    def __init__(self, *args, head_epochs: int = 5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head_epochs = head_epochs

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """The head-then-body schedule on top of the base settings."""
        return replace(super().device_config(rnd, device), head=self.head,
                       head_epochs=self.head_epochs)
