"""Centralised training: all devices' data pooled in one place, one epoch per round.

The upper bound that federated algorithms are measured against. The engine trains it as one
pseudo-device (`POOLED`) that holds the whole training set; nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Sequence

from .payload import Payload, State, Update
from .strategy import Strategy

POOLED = -1


class Central(Strategy):
    """Plain training on the pooled data."""

    name = "central"
    communicates = False

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]
                        ) -> dict[int, Payload]:
        """One payload, for the pooled pseudo-device, whoever was sampled."""
        _, weights = self.global_model(state)
        return {POOLED: Payload(self.spec, weights, self.device_config(rnd, POOLED))}

    def aggregate_train(self, rnd: int, state: State, updates: dict[int, Update]) -> State:
        """The pooled model's weights become the global state."""
        return dict(updates[POOLED].state)
