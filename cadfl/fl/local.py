"""Local-only training: every device trains its own model alone and never shares it.

The reference for "is federating worth it at all": each device's model is scored on the test
images of its own classes. There is no global model, so `global_acc` is not defined. The
device keeps its model (`keep="*"`, all of it private); the cloud only holds the common
initial weights, which a device starts from the first time it trains.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models import ModelSpec
from .payload import Payload, State
from .registry import register
from .strategy import Payloads, Strategy, Updates

EVERYTHING = ("*",)


@register
class Local(Strategy):
    """Each device keeps and trains its own copy of the model."""

    name = "local"
    summary = "every device trains its own model alone (is federating worth it?)"
    family = "personalised"
    judged_by = "context_acc"
    context_from_global = False
    communicates = False

    def global_model(self, state: State) -> tuple[ModelSpec, State] | None:
        """Local training has no global model."""
        return None

    def payload(self, rnd: int, device: int, spec: ModelSpec, weights: State) -> Payload:
        """The initial weights, which the device replaces by its own model where it has one."""
        return Payload(spec, weights, self.device_config(rnd, device), keep=EVERYTHING,
                       private=EVERYTHING)

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]) -> Payloads:
        """Each participant continues from its own weights."""
        for d in device_ids:
            yield d, self.payload(rnd, d, self.spec, state)

    def aggregate_train(self, rnd: int, state: State, updates: Updates) -> State:
        """Nothing is averaged: the devices keep what they trained."""
        for _ in updates:
            pass
        return state

    def configure_evaluate(self, rnd: int, state: State, device_ids: Sequence[int]
                           ) -> Payloads:
        """Each device scores its own model."""
        return self.configure_train(rnd, state, device_ids)
