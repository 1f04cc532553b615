"""The `Strategy` interface, shaped like Flower's message strategies.

A strategy turns a global state into per-device payloads (`configure_train`,
`configure_evaluate`) and device updates back into a global state (`aggregate_train`). It
holds no transport and no data: the simulation engine and the Flower adapter both drive it.
The global state is a flat dict of tensors, so a checkpoint is one safetensors file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

from ..cad.grow import grow_dense
from ..models import ModelSpec
from .aggregate import MEAN, Robustness, is_bn_stat
from .payload import DeviceInfo, Payload, State, TrainConfig, Update

BN_MODES = ("average", "keep_local")
LOCAL_PREFIX = "local/"


def device_seed(seed: int, rnd: int, device: int) -> int:
    """The training seed of one device in one round: distinct, and the same in every run."""
    return (seed * 1_000_003 + rnd * 10_007 + device + 1) % (2**63)


class Strategy(ABC):
    """A federated algorithm: payloads out, updates in.

    `context_from_global` says that a device's own model is the global model restricted to the
    device's classes, so the engine can score every device from one pass of the global model.
    `communicates` is False for references that move no bytes (centralised training).
    `bn="keep_local"` keeps each device's batch-norm running statistics on the device across
    rounds (SiloBN-style); the global model still carries their weighted average.
    `robust` chooses how holders are combined (weighted mean, or a robust statistic).
    `notes` holds what the algorithm wants recorded in the run directory (JSON-able).
    """

    name: ClassVar[str]
    context_from_global: ClassVar[bool] = True
    communicates: ClassVar[bool] = True

    def __init__(self, spec: ModelSpec, train: TrainConfig, devices: Sequence[DeviceInfo],
                 bn: str = "average", robust: Robustness = MEAN) -> None:
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        self.spec, self.train, self.bn, self.robust = spec, train, bn, robust
        self.devices = {d.id: d for d in devices}
        self.notes: dict = {}

    def initial_state(self, weights: State) -> State:
        """The round-0 global state from the dense model's initial weights."""
        return dict(weights)

    def global_model(self, state: State) -> tuple[ModelSpec, State] | None:
        """The cloud's model, scored on the whole test set (None if there is none)."""
        return self.spec, {k: v for k, v in state.items() if not k.startswith(LOCAL_PREFIX)}

    def add_classes(self, state: State, classes: Sequence[int], seed: int) -> State:
        """Register classes the model does not have yet (New Class): each gets a logit, drawn
        from `seed`, and every existing output stays as it was. Classes the model already has
        are skipped, and a state that already holds the new rows (a resumed run) is kept."""
        new = tuple(c for c in classes if c not in self.spec.class_ids)
        if not new:
            return state
        self.spec, state = grow_dense(self.spec, state, new, seed)
        return state

    def device_model_is_global(self) -> bool:
        """Whether each device's model is the global model restricted to its classes."""
        return self.context_from_global and self.bn == "average"

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """The training settings a device gets this round (its own seed)."""
        return replace(self.train, seed=device_seed(self.train.seed, rnd, device))

    @abstractmethod
    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]
                        ) -> dict[int, Payload]:
        """Payloads for this round's participants."""

    @abstractmethod
    def aggregate_train(self, rnd: int, state: State, updates: dict[int, Update]) -> State:
        """The next global state from this round's updates (device order: ascending id)."""

    def configure_query(self, rnd: int, state: State, device_ids: Sequence[int]
                        ) -> dict[int, Payload]:
        """Payloads asking devices for statistics before this round's training (default none)."""
        return {}

    def aggregate_query(self, rnd: int, state: State, replies: dict[int, Update]) -> State:
        """The state after the devices' answers to `configure_query` (default unchanged)."""
        return state

    def configure_evaluate(self, rnd: int, state: State, device_ids: Sequence[int]
                           ) -> dict[int, Payload]:
        """The model each device scores on its own classes (default: the global model, with
        the device's own batch-norm statistics when they are kept local)."""
        model = self.global_model(state)
        assert model is not None, "strategies without a global model override this"
        spec, weights = model
        return {d: Payload(spec, self.with_local_stats(d, state, weights),
                           self.device_config(rnd, d)) for d in device_ids}

    # Batch-norm statistics kept on the device ("keep_local").

    def with_local_stats(self, device: int, state: State, payload_state: State) -> State:
        """The payload state with the device's own BN statistics where it kept them."""
        if self.bn != "keep_local":
            return payload_state
        prefix = f"{LOCAL_PREFIX}{device}/"
        out = dict(payload_state)
        for key, t in payload_state.items():
            mine = state.get(prefix + key)
            if mine is not None and mine.shape == t.shape:
                out[key] = mine
        return out

    def store_local_stats(self, state: State, updates: dict[int, Update]) -> State:
        """Record each participant's BN statistics in the state (when keeping them local)."""
        if self.bn != "keep_local":
            return state
        out = dict(state)
        for d, u in updates.items():
            out.update({f"{LOCAL_PREFIX}{d}/{k}": v for k, v in u.state.items() if is_bn_stat(k)})
        return out
