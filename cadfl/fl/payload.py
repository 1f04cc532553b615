"""What travels between the cloud and a device: a self-describing `Payload` down, an `Update` up.

A payload carries everything a device needs to train without knowing the algorithm: the network
as a `ModelSpec`, its weights, and a `TrainConfig`. An update carries the trained weights back,
with the counts the cloud needs to weight them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property
from typing import ClassVar

import torch

from ..checks import check_range
from ..models import ModelSpec

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How a device trains its model. The fields named in `SETTINGS` are the run config's
    `[train]` table (the user's local SGD settings; their defaults are a run's, `check`
    validates them); the experiment sets `seed` and `precision`; algorithms switch on the
    hooks, each a property of the local objective or schedule, not of an algorithm's name:

    - `objective`: the name of a registered local objective (`cadfl.device.objective`) whose
      penalty, with the keyword arguments `objective_args`, is added to the cross-entropy
      (FedProx's proximal term).
    - `head` (glob patterns of parameter names) with `head_epochs` > 0: first `head_epochs`
      epochs on the head alone, then `epochs` on the rest alone (FedRep).
    - `personal_lambda` > 0: the device also trains its personal model (`personal/` tensors,
      starting from the received model the first time) with the proximal term
      (lambda/2)||v - w_received||^2 towards the received model (Ditto).
    - `control`: SCAFFOLD's correction w -= lr (c_server - c_device) after every optimizer
      step, with the server's control variate in the payload (`control/`) and the device's
      own (`own_control/`).
    - `mask_absent`: cross-entropy over the logits of the classes the device holds only
      (HeteroFL's label split).
    - `personal_head` (glob patterns of parameter names) with `personal_epochs` > 0: before
      its training, the device fits its own copy of those layers (`personal/` tensors, the
      received ones the first time) for `personal_epochs` epochs on the features that the
      received model's earlier layers give its images, computed once without augmentation;
      the training after it is unchanged, and the device predicts with its copy (CAD's
      personal paths).
    - `lr_scales`: (glob pattern, factor) pairs: a parameter matching a pattern trains at
      `lr` times its factor (the first pattern that matches; CAD's path learning rate).

    `precision` ("fp32" or "bf16", `cadfl.device.precision`) is how the device computes; it
    changes neither what is trained nor what is sent.
    """

    SETTINGS: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr", "momentum",
                                           "weight_decay", "augment")

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = True
    fraction: float = 1.0  # share of the local SGD steps actually done (a straggler: < 1)
    objective: str = ""
    objective_args: tuple[tuple[str, float], ...] = ()
    head: tuple[str, ...] = ()
    head_epochs: int = 0
    personal_lambda: float = 0.0
    control: bool = False
    mask_absent: bool = False
    personal_head: tuple[str, ...] = ()
    personal_epochs: int = 0
    lr_scales: tuple[tuple[str, float], ...] = ()
    precision: str = "fp32"

    def check(self) -> None:
        """ValueError naming the `[train]` setting if one is out of range."""
        check_range("train.epochs", self.epochs, 1)
        check_range("train.batch_size", self.batch_size, 1)
        check_range("train.lr", self.lr, 0, low_open=True)
        check_range("train.momentum", self.momentum, 0, 1)
        check_range("train.weight_decay", self.weight_decay, 0)

    def to_dict(self) -> dict:
        """Plain dict form (for payload transport and run configs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of `to_dict`, also after JSON (lists back to tuples)."""
        return cls(**{**d, "head": tuple(d.get("head", ())),
                      "personal_head": tuple(d.get("personal_head", ())),
                      "lr_scales": tuple(map(tuple, d.get("lr_scales", ()))),
                      "objective_args": tuple(map(tuple, d.get("objective_args", ())))})


# Tensors of a payload or update that are not the model's own: the server's control variate
# and the device's change of it (SCAFFOLD), the device's own control variate and its personal
# model (kept on the device). Model tensors never contain "/".
CONTROL, OWN_CONTROL, PERSONAL = "control/", "own_control/", "personal/"


def model_part(state: State, prefix: str = "") -> State:
    """The model's tensors of `state` (`prefix=""`), or those under `prefix` without it."""
    if not prefix:
        return {k: v for k, v in state.items() if "/" not in k}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


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
    layer and class path: see `cadfl.device.store`). Of those, the ones matching `private`
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

    @cached_property  # asked for every device at every evaluation: thousands of times
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
