"""FedPer (Arivazhagan et al. 2019): federated body, personal head.

The last `head_layers` conv/linear layers or blocks (with their batch norm) are each device's
own: the device keeps them between rounds and never sends them; the cloud averages the body only. A
device that trains for the first time starts its head from the cloud's initial one. There is
no global model (the cloud never holds a trained head), so FedPer is judged by context
accuracy: each device's own model on its own classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..checks import check_range
from ..models import ModelSpec
from .fedavg import FedAvg
from .payload import Payload, State
from .registry import register
from .strategy import Payloads


def head_patterns(spec: ModelSpec, layers: int) -> tuple[str, ...]:
    """Glob patterns of the last `layers` conv/linear layers' (or blocks') tensors and of the
    batch norm after each of them: the personal head."""
    weighted = [i for i, layer in enumerate(spec.layers) if layer.weighted]
    names = []
    for i in weighted[-layers:]:
        names.append(spec.names[i])
        if i + 1 < len(spec.layers) and spec.layers[i + 1].kind == "bn":
            names.append(spec.names[i + 1])
    return tuple(f"{name}.*" for name in names)


@dataclass
class FedPerOptions:
    """FedPer's settings (`[fedper]`)."""

    head_layers: int = 1  # the last N conv/linear layers (or blocks) are personal

    def check(self, cfg: Any) -> None:
        """ValueError naming the field if a value is out of range."""
        check_range("fedper.head_layers", self.head_layers, 1)


@register
class FedPer(FedAvg):
    """FedAvg of the body; each device keeps its own head."""

    name = "fedper"
    summary = "federated body, personal classifier head kept on each device"
    family = "personalised"
    judged_by = "context_acc"
    context_from_global = False
    Options = FedPerOptions

    def __init__(self, *args, head_layers: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weighted = sum(layer.weighted for layer in self.spec.layers)
        if not 1 <= head_layers < weighted:
            raise ValueError(f"{self.name}.head_layers={head_layers}: the model has {weighted} "
                             f"conv/linear layers and blocks; allowed 1 to {weighted - 1} (a "
                             "body must remain)")
        self.head = head_patterns(self.spec, head_layers)

    def global_model(self, state: State) -> tuple[ModelSpec, State] | None:
        """No global model: the cloud never holds a trained head."""
        return None

    def payload(self, rnd: int, device: int, spec: ModelSpec, weights: State) -> Payload:
        """The model; the device puts in its own head and keeps it to itself."""
        base = super().payload(rnd, device, spec, weights)
        return Payload(spec, weights, base.config, keep=(*base.keep, *self.head),
                       private=self.head)

    def configure_evaluate(self, rnd: int, state: State, device_ids: Sequence[int]
                           ) -> Payloads:
        """Each device scores its own model: the body with its head."""
        return self.configure_train(rnd, state, device_ids)
