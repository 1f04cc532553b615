"""Centralised training: all devices' data pooled in one place, one epoch per round.

The upper bound that federated algorithms are measured against. The engine trains it as one
pseudo-device (`POOLED`) that holds the whole training set; nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Sequence

from .payload import State
from .registry import register
from .strategy import Payloads, Strategy, Updates

POOLED = -1


@register
class Central(Strategy):
    """Plain training on the pooled data."""

    name = "central"
    summary = "all devices' data pooled in one place: the upper bound"
    family = "reference"
    communicates = False

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]) -> Payloads:
        """One payload, for the pooled pseudo-device, whoever was sampled."""
        yield POOLED, self.payload(rnd, POOLED, self.spec, state)

    def aggregate_train(self, rnd: int, state: State, updates: Updates) -> State:
        """The pooled model's weights become the global state."""
        out = dict(state)
        for _, u in updates:
            out.update(u.state)
        return out
