"""What travels between the cloud and a device: a self-describing `Payload` down, an `Update` up.

A payload carries everything a device needs to train without knowing the algorithm: the network
as a `ModelSpec`, its weights, and a `TrainConfig`. An update carries the trained weights back,
with the counts the cloud needs to weight them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase

import torch

from ..models import ModelSpec

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How a device trains its model: local SGD settings, FedProx's mu and the seed."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mu: float = 0.0
    seed: int = 0
    augment: bool = True
    fraction: float = 1.0  # share of the local SGD steps actually done (a straggler: < 1)

    def to_dict(self) -> dict:
        """Plain dict form (for payload transport and run configs)."""
        return asdict(self)


TASKS = ("train", "activations")


def matches(key: str, patterns: Sequence[str]) -> bool:
    """Whether state key `key` matches any of the glob `patterns`."""
    return any(fnmatchcase(key, p) for p in patterns)


@dataclass
class Payload:
    """A model for a device, and what to do with it: `task` is "train" (local training) or
    "activations" (report per-class sums of every filter's activation, nothing else).

    `keep` names the state tensors the device keeps between rounds (glob patterns over state
    keys, e.g. `"*.running_mean"` or `"*"`): where the device holds its own value, that value
    replaces the payload's before training, and the trained value is stored afterwards (by
    layer and class path: see `cadfl.runtime.store`). Of those, the ones matching `private`
    never leave the device: the update does not carry them.
    """

    spec: ModelSpec
    state: State
    config: TrainConfig = field(default_factory=TrainConfig)
    task: str = "train"
    keep: tuple[str, ...] = ()
    private: tuple[str, ...] = ()

    def returned_keys(self) -> list[str]:
        """The state keys a trained update carries back: all but the private ones."""
        return [k for k in self.state if not matches(k, self.private)]


@dataclass
class Update:
    """A device's answer: trained weights, how many samples it saw, and what it measured.

    `class_counts` is indexed by global class id; `metrics` holds at least `train_loss` and
    `train_flops` (forward + backward FLOPs of the whole local training, counted by torch).
    """

    state: State
    num_samples: int
    class_counts: list[int]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceInfo:
    """What the cloud knows about a device: its id, its classes and per-class sample counts."""

    id: int
    class_counts: tuple[int, ...]

    @property
    def classes(self) -> tuple[int, ...]:
        """The device's context: the classes it holds samples of, ascending."""
        return tuple(c for c, n in enumerate(self.class_counts) if n > 0)

    @property
    def num_samples(self) -> int:
        """Number of local training samples."""
        return sum(self.class_counts)


def state_bytes(state: State) -> int:
    """Bytes on the wire for a state dict: the raw tensor data, as sent."""
    return sum(t.numel() * t.element_size() for t in state.values())
