"""The `Strategy` interface, shaped like Flower's message strategies.

A strategy turns a global state into per-device payloads (`configure_train`,
`configure_evaluate`) and device updates back into a global state (`aggregate_train`). It
holds no transport and no data: the simulation engine and the Flower adapter both drive it.
Payloads and updates flow as iterators, so a round never needs all of them in memory: the
engine trains a device when the strategy's aggregation asks for its update. The global state
is a flat dict of tensors, so a checkpoint is one safetensors file; what a strategy knows
beyond its tensors (CAD's class paths) is its `structure`, saved beside it.

What a device keeps between rounds (its batch-norm statistics, its own model, personal
layers) is not in the global state: the payload names it (`Payload.keep`) and the device side
keeps it (`cadfl.device.store`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from ..cad.grow import grow_dense
from ..models import ModelSpec
from .aggregate import BN_STATS, MEAN, Contribution, Robustness, aggregate
from .payload import DeviceInfo, Payload, State, TrainConfig, Update

BN_MODES = ("average", "keep_local")
BN_STAT_KEYS = tuple(f"*.{name}" for name in BN_STATS)

Updates = Iterable[tuple[int, Update]]
Payloads = Iterator[tuple[int, Payload]]


def device_seed(seed: int, rnd: int, device: int) -> int:
    """The training seed of one device in one round: distinct, and the same in every run."""
    return (seed * 1_000_003 + rnd * 10_007 + device + 1) % (2**63)


@dataclass
class Setting:
    """What every strategy of a run is built from: the dense model, the device training
    settings, the devices, the batch-norm mode, the aggregation rule, the label of
    out-of-context images (Others; None when the run has none) and the initial weights (an
    algorithm's own settings come separately, as its `Options`)."""

    spec: ModelSpec
    train: TrainConfig
    devices: Sequence[DeviceInfo]
    bn: str = "average"
    robust: Robustness = MEAN
    other: int | None = None
    init: State | None = None


class Strategy(ABC):
    """A federated algorithm: payloads out, updates in.

    Class attributes say what it is: `name` (registry key), `summary` (one line for
    `--help`), `family` (global, personalised, sub-model, grouped, cad, or reference) and
    `judged_by` (the metric to compare it on: global_acc, context_acc, or both), and
    `Options`, the dataclass of its settings (the config's `[NAME]` table, with a
    `check(cfg)` that raises ValueError naming the field), or None.

    `context_from_global` says that a device's own model is the global model restricted to the
    device's classes, so the engine can score every device from one pass of the global model.
    `communicates` is False for references that move no bytes (centralised training).
    `bn="keep_local"` keeps each device's batch-norm running statistics on the device across
    rounds (SiloBN-style); the global model still carries their weighted average.
    `robust` chooses how holders are combined (weighted mean, or a robust statistic).
    `notes` holds what the algorithm wants recorded in the run directory (JSON-able).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    family: ClassVar[str] = "global"
    judged_by: ClassVar[str] = "both"
    Options: ClassVar[type | None] = None
    context_from_global: ClassVar[bool] = True
    communicates: ClassVar[bool] = True

    def __init__(self, spec: ModelSpec, train: TrainConfig, devices: Sequence[DeviceInfo],
                 bn: str = "average", robust: Robustness = MEAN) -> None:
        self.spec, self.train, self.bn, self.robust = spec, train, bn, robust
        self.devices = {d.id: d for d in devices}
        self.notes: dict = {}

    @classmethod
    def from_setting(cls, setting: Setting, options: Any = None) -> Strategy:
        """The strategy for a run: its setting, and its `Options` as keyword arguments."""
        return cls(setting.spec, setting.train, setting.devices, bn=setting.bn,
                   robust=setting.robust, **(asdict(options) if options is not None else {}))

    def begin_round(self, rnd: int, devices: Mapping[int, DeviceInfo]) -> None:
        """Called by the engine before round `rnd` is configured, with every device's classes
        in that round (they change with a context schedule)."""
        self.devices = dict(devices)

    @staticmethod
    def answers_others(options: Any) -> bool:
        """Whether the strategy, with these settings, has an "Others" output (then the run
        labels out-of-context images for it)."""
        return False

    def initial_state(self, weights: State) -> State:
        """The round-0 global state from the dense model's initial weights."""
        return dict(weights)

    def global_model(self, state: State) -> tuple[ModelSpec, State] | None:
        """The cloud's model, scored on the whole test set (None if there is none)."""
        return self.spec, state

    def structure(self) -> dict[str, Any]:
        """What the strategy knows beyond its tensors (JSON-able), saved with every
        checkpoint and given back to `restore` on resume. Default: the model's spec (its
        classes grow with New Class)."""
        return {"spec": self.spec.to_dict()}

    def restore(self, structure: dict[str, Any]) -> None:
        """Take up a saved `structure` (a resumed run)."""
        if "spec" in structure:
            self.spec = ModelSpec.from_dict(structure["spec"])

    def add_classes(self, state: State, classes: Sequence[int], seed: int) -> State:
        """Register classes the model does not have yet (New Class): each gets a logit, drawn
        from `seed`, and every existing output stays as it was. Classes the model already has
        are skipped."""
        new = tuple(c for c in classes if c not in self.spec.class_ids)
        if not new:
            return state
        self.spec, state = grow_dense(self.spec, state, new, seed)
        return state

    def device_model_is_global(self) -> bool:
        """Whether each device's model is the global model restricted to its classes."""
        return self.context_from_global and self.bn == "average"

    def device_outputs(self, device: int) -> tuple[int, ...] | None:
        """Where a device's model is the global one (`device_model_is_global`): the classes
        its model answers among, None for all of the global model's (its open accuracy)."""
        return None

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """The training settings a device gets this round (its own seed)."""
        return replace(self.train, seed=device_seed(self.train.seed, rnd, device))

    def kept(self) -> tuple[str, ...]:
        """State keys (glob patterns) every device keeps between rounds."""
        return BN_STAT_KEYS if self.bn == "keep_local" else ()

    def payload(self, rnd: int, device: int, spec: ModelSpec, weights: State) -> Payload:
        """A training payload for `device` with this strategy's settings and kept tensors."""
        return Payload(spec, weights, self.device_config(rnd, device), keep=self.kept())

    @abstractmethod
    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]) -> Payloads:
        """Payloads for this round's participants, produced one at a time."""

    def contribution(self, rnd: int, state: State, device: int, update: Update
                     ) -> Contribution:
        """How one update enters the average (default: every tensor whole, weighted by the
        device's sample count)."""
        return Contribution(update.state, update.num_samples)

    def aggregate_train(self, rnd: int, state: State, updates: Updates) -> State:
        """The next global state from this round's updates, folded in as they arrive
        (device order: ascending id). Default: `aggregate` of every `contribution`."""
        return aggregate(state, (self.contribution(rnd, state, d, u) for d, u in updates),
                         self.robust)

    def configure_query(self, rnd: int, state: State, device_ids: Sequence[int]
                        ) -> dict[int, Payload]:
        """Payloads asking devices for statistics before this round's training (default none)."""
        return {}

    def aggregate_query(self, rnd: int, state: State, replies: dict[int, Update]) -> State:
        """The state after the devices' answers to `configure_query` (default unchanged)."""
        return state

    def configure_evaluate(self, rnd: int, state: State, device_ids: Sequence[int]
                           ) -> Payloads:
        """The model each device scores on its own classes (default: the global model; the
        device puts in what it keeps, e.g. its own batch-norm statistics)."""
        model = self.global_model(state)
        assert model is not None, "strategies without a global model override this"
        spec, weights = model
        for d in device_ids:
            yield d, self.payload(rnd, d, spec, weights)
