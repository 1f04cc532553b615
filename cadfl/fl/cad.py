"""CAD (Qin & Jiang, SEC 2020): context sub-models and path-paired aggregation; and Fed2.

The global model is decoupled into a shared trunk and one path per class (`cadfl.cad`). A
device whose context is the class set S receives the sub-model of S: the trunk and S's paths,
physically smaller. The cloud averages the trunk over all participants (weighted by sample
count) and class c's path only over the participants holding c (weighted by their class-c
counts); rows no participant held keep their value.

Fed2 (Yu et al., KDD 2021) is the ablation "same grouped model, same path-paired averaging, but
every device trains the whole model": the sub-model of all classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cad.decouple import decouple
from ..cad.submodel import extract, index_map, row_classes
from ..models import ModelSpec, build_model
from .aggregate import Contribution, aggregate
from .payload import DeviceInfo, Payload, State, TrainConfig, Update
from .strategy import LOCAL_PREFIX, Strategy


class CAD(Strategy):
    """Context-aware distributed learning with class paths from `depth` (conv layers from the
    end) on, filters assigned to classes in equal contiguous groups (`prior`)."""

    name = "cad"

    def __init__(self, spec: ModelSpec, train: TrainConfig, devices: Sequence[DeviceInfo],
                 bn: str = "average", depth: int = 1) -> None:
        self.decoupling = decouple(spec, spec.num_classes, depth)
        super().__init__(self.decoupling.spec, train, devices, bn=bn)
        self.dense_spec = spec

    def initial_state(self, weights: State) -> State:
        """The decoupled model: the dense model's trunk, and class paths initialised with their
        own fan-in from the run's seed."""
        with torch.random.fork_rng():
            torch.manual_seed(self.train.seed)
            state = {k: v.clone() for k, v in build_model(self.spec).state_dict().items()}
        for key in state:
            if not self.decoupling.is_path_key(key):
                state[key] = weights[key].clone()
        return state

    def device_classes(self, device: int) -> tuple[int, ...]:
        """The classes whose paths a device receives: its own context."""
        return self.devices[device].classes

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]
                        ) -> dict[int, Payload]:
        """Each participant gets the sub-model of its classes."""
        _, weights = self.global_model(state)
        out = {}
        for d in device_ids:
            spec, sub, _ = extract(self.decoupling, weights, self.device_classes(d))
            out[d] = Payload(spec, self.with_local_stats(d, state, sub), self.device_config(rnd, d))
        return out

    def aggregate_train(self, rnd: int, state: State, updates: dict[int, Update]) -> State:
        """Path-paired averaging: trunk over everyone, class c's path over c's holders."""
        _, weights = self.global_model(state)
        contributions = []
        for d in sorted(updates):
            u, classes = updates[d], self.device_classes(d)
            rows = index_map(self.decoupling, weights, classes)
            counts = torch.tensor(u.class_counts, dtype=torch.float64)
            row_weights = {k: counts[row_classes(self.decoupling, k, classes)] for k in rows}
            contributions.append(Contribution(u.state, u.num_samples, rows, row_weights))
        merged = aggregate(weights, contributions)
        local = {k: v for k, v in state.items() if k.startswith(LOCAL_PREFIX)}
        return self.store_local_stats({**merged, **local}, updates)


class Fed2(CAD):
    """Fed2: the grouped model trained whole on every device, with path-paired averaging."""

    name = "fed2"

    def device_classes(self, device: int) -> tuple[int, ...]:
        """Every class: devices train the full grouped model (paths of absent classes get
        weight zero in the average)."""
        return tuple(range(self.decoupling.num_classes))
