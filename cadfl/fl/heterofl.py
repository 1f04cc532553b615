"""HeteroFL (Diao et al., ICLR 2021): width-scaled sub-models of one global model.

A device of rate r in (0, 1] receives the global model with every hidden conv and linear layer
cut to its first ceil(r * width) output channels (the next layer to the matching inputs, batch
norm to the kept channels; the logits layer keeps every class): a physically smaller dense
network (`cadfl.fl.width`). The cloud averages every coordinate over the participants whose
sub-model holds it, weighted by their sample counts; coordinates nobody held keep their value.

Label split (the paper's classifier for non-iid data): devices train with the logits of classes
they have no samples of masked out (`TrainConfig.mask_absent`), and row c of the logits layer is
averaged only over the participants holding class c, weighted by their (whole) sample counts,
like every other coordinate they send: all of a device's samples shape its row c through the
softmax, not only those of class c.

Rates: `rates = []` (the default, "auto") gives every device the width whose training FLOPs per
sample equal the mean over the run's devices of CAD's sub-model decoupled at `depth` (set it to
the run's `cad.depth`), so HeteroFL and CAD are compared at equal device cost; the chosen rate
is recorded in the run directory (`notes-heterofl.json`).
A list of rates is dealt to devices by id, `round_robin` (device d gets rates[d mod len]) or
`random` (a draw seeded by the run's seed and the device id).

Scored like the paper: the full global model on the test set, and on each device's classes.
Left out: HeteroFL's scaler module (outputs scaled by 1/r in training) and its static batch
norm (statistics recomputed after training); running statistics are averaged over their
holders like every other coordinate, and `bn = "keep_local"` is refused. A run's Others label
is not supported (as in FedAvg, a device trains on its own classes only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from ..cad.decouple import decouple
from ..cad.submodel import submodel_spec
from ..checks import check_one_of, check_range
from ..models import ModelSpec
from ..models.flops import train_flops_per_sample
from .aggregate import MEAN, Contribution, Robustness
from .payload import DeviceInfo, State, TrainConfig, Update
from .registry import register
from .strategy import Payloads, Setting, Strategy
from .width import Maps, channel_window, slice_state, width_maps

ASSIGN = ("round_robin", "random")


@dataclass
class HeteroFLOptions:
    """HeteroFL's settings (`[heterofl]`): the devices' width rates."""

    algorithm: ClassVar[str] = "heterofl"
    rates: list[float] = field(default_factory=list)  # [] = auto: CAD's sub-model cost
    assign: str = "round_robin"  # how a list of rates is dealt: round_robin or random
    depth: int = 1  # auto rate: the decoupling depth of the CAD sub-models it costs as much as

    def check(self, cfg: Any) -> None:
        """ValueError naming the field if a value is out of range, or if devices are to keep
        their batch-norm statistics (`bn = "keep_local"`)."""
        for i, r in enumerate(self.rates):
            check_range(f"{self.algorithm}.rates[{i}]", r, 0, 1, low_open=True)
        check_one_of(f"{self.algorithm}.assign", self.assign, ASSIGN)
        check_range(f"{self.algorithm}.depth", self.depth, 0)
        if self.algorithm not in cfg.algorithms:
            return
        if cfg.bn == "keep_local":
            # A device keeps the statistics of its own channels, a narrower (FedRolex: a
            # moving) set than the global model it would be scored with.
            raise ValueError(f"bn: 'keep_local' does not fit {self.algorithm} (a device keeps "
                             "statistics of its sub-model's channels only); use 'average'")


def mean_cad_flops(spec: ModelSpec, devices: Sequence[DeviceInfo], depth: int) -> float:
    """Training FLOPs per sample of CAD's sub-models at decoupling `depth`, averaged over
    the devices (each device's sub-model holds its own classes)."""
    dec = decouple(spec, spec.num_classes, depth)
    flops = [train_flops_per_sample(submodel_spec(dec, d.classes)) for d in devices
             if d.classes]
    return float(np.mean(flops))


def width_flops(spec: ModelSpec, rate: float) -> int:
    """Training FLOPs per sample of the HeteroFL sub-model of `rate`."""
    return train_flops_per_sample(width_maps(spec, channel_window(spec, rate))[0])


def matched_rate(spec: ModelSpec, target: float, steps: int = 20) -> float:
    """The rate in (0, 1] whose sub-model's training FLOPs per sample are closest to `target`
    (bisection: the FLOPs grow with the rate in steps of one channel)."""
    if width_flops(spec, 1.0) <= target:
        return 1.0
    lo, hi = 0.0, 1.0  # width_flops(lo) < target <= width_flops(hi); lo = 0 is no model
    for _ in range(steps):  # 2**-20 is finer than one channel of any layer's width
        mid = (lo + hi) / 2
        if width_flops(spec, mid) < target:
            lo = mid
        else:
            hi = mid
    if lo > 0 and target - width_flops(spec, lo) < width_flops(spec, hi) - target:
        return lo
    return hi


@register
class HeteroFL(Strategy):
    """Width-scaled sub-models by a per-device rate, averaged over the holders of every
    coordinate, with the label-split classifier."""

    name = "heterofl"
    summary = "width-scaled sub-models by device rate, label-split classifier (ICLR 2021)"
    family = "sub-model"
    judged_by = "both"
    Options = HeteroFLOptions

    @classmethod
    def from_setting(cls, setting: Setting, options: HeteroFLOptions | None = None
                     ) -> HeteroFL:
        """The strategy for a run (the auto rate needs the run's devices)."""
        o = options or cls.Options()
        return cls(setting.spec, setting.train, setting.devices, bn=setting.bn,
                   robust=setting.robust, rates=tuple(o.rates), assign=o.assign, depth=o.depth)

    def __init__(self, spec: ModelSpec, train: TrainConfig, devices: Sequence[DeviceInfo],
                 bn: str = "average", robust: Robustness = MEAN, rates: Sequence[float] = (),
                 assign: str = "round_robin", depth: int = 1) -> None:
        super().__init__(spec, train, devices, bn=bn, robust=robust)
        self.rates, self.assign = tuple(rates), assign
        if not self.rates:
            # Counting FLOPs builds models, which draws from the global RNG.
            with torch.random.fork_rng():
                target = mean_cad_flops(spec, devices, depth)
                rate = matched_rate(spec, target)
                self.notes = {"auto_rate": rate, "cad_depth": depth,
                              "cad_train_flops_per_sample": target,
                              "train_flops_per_sample": width_flops(spec, rate)}
            self.rates = (rate,)

    def structure(self) -> dict[str, Any]:
        """The rates (an auto rate depends on the devices' classes when the run started)."""
        return {**super().structure(), "rates": list(self.rates)}

    def restore(self, structure: dict[str, Any]) -> None:
        """Take up the saved rates (a resumed run)."""
        super().restore(structure)
        self.rates = tuple(structure["rates"])

    def rate_of(self, device: int) -> float:
        """The width rate of `device`."""
        if self.assign == "round_robin":
            return self.rates[device % len(self.rates)]
        pick = np.random.default_rng([self.train.seed, device]).integers(len(self.rates))
        return self.rates[int(pick)]

    def kept_channels(self, rnd: int, rate: float) -> Maps:
        """The output channels of every hidden layer a device of `rate` holds in round `rnd`:
        HeteroFL's are always the first ones."""
        return channel_window(self.spec, rate)

    def device_maps(self, rnd: int, device: int) -> tuple[ModelSpec, Maps, Maps]:
        """The sub-model spec of `device` in round `rnd`, and its row and column maps."""
        return width_maps(self.spec, self.kept_channels(rnd, self.rate_of(device)))

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """The run's settings with the label split: logits of absent classes masked."""
        return replace(super().device_config(rnd, device), mask_absent=True)

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]) -> Payloads:
        """Each participant gets its width's sub-model."""
        for d in device_ids:
            spec, rows, cols = self.device_maps(rnd, d)
            yield d, self.payload(rnd, d, spec, slice_state(state, rows, cols))

    def contribution(self, rnd: int, state: State, device: int, update: Update
                     ) -> Contribution:
        """The device's rows and columns, weighted by its sample count; logit rows of the
        classes it has no samples of get weight zero (label split)."""
        _, rows, cols = self.device_maps(rnd, device)
        logits = self.spec.names[-1]
        counts = torch.tensor(update.class_counts, dtype=torch.float64)
        holds = counts[list(self.spec.class_ids)] > 0
        split = torch.where(holds, float(update.num_samples), 0.0)
        row_weights = {f"{logits}.{k}": split for k in ("weight", "bias")
                       if f"{logits}.{k}" in update.state}
        return Contribution(update.state, update.num_samples, rows, row_weights, cols)
