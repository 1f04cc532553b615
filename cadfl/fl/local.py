"""Local-only training: every device trains its own model alone and never shares it.

The reference for "is federating worth it at all": each device's model is scored on the test
images of its own classes. There is no global model, so `global_acc` is not defined.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models import ModelSpec
from .payload import Payload, State, Update
from .strategy import Strategy


def _prefix(device: int) -> str:
    return f"device/{device}/"


class Local(Strategy):
    """Each device keeps and trains its own copy of the model."""

    name = "local"
    context_from_global = False
    communicates = False

    def initial_state(self, weights: State) -> State:
        """One copy of the initial weights per device."""
        return {_prefix(d) + k: v.clone() for d in sorted(self.devices) for k, v in weights.items()}

    def global_model(self, state: State) -> tuple[ModelSpec, State] | None:
        """Local training has no global model."""
        return None

    def _own(self, state: State, device: int) -> State:
        p = _prefix(device)
        return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]
                        ) -> dict[int, Payload]:
        """Each participant continues from its own weights."""
        return {d: Payload(self.spec, self._own(state, d), self.device_config(rnd, d))
                for d in device_ids}

    def aggregate_train(self, rnd: int, state: State, updates: dict[int, Update]) -> State:
        """Nothing is averaged: each participant's weights replace its own copy."""
        out = dict(state)
        for d in sorted(updates):
            out.update({_prefix(d) + k: v for k, v in updates[d].state.items()})
        return out

    def configure_evaluate(self, rnd: int, state: State, device_ids: Sequence[int]
                           ) -> dict[int, Payload]:
        """Each device scores its own model."""
        return {d: Payload(self.spec, self._own(state, d), self.device_config(rnd, d))
                for d in device_ids}
