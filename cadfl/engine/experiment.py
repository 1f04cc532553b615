"""`Experiment`: everything the algorithms of one run share (data, partition, model, initial
weights, the devices of the round), and the strategies and device runtimes made from it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import Config, ConfigError, dataset_of
from ..data.context import Schedule, gains
from ..data.datasets import Dataset
from ..data.partition import Partition, hold_out, make_partition, share_classes
from ..device.compute import resolve_device, to_compute
from ..device.executor import Runtime
from ..device.precision import memory_format, resolve_precision
from ..device.store import DeviceStore
from ..device.train import DeviceData
from ..fl import ALGORITHMS, Setting, Strategy
from ..fl.aggregate import Robustness
from ..fl.central import POOLED
from ..fl.payload import DeviceInfo, State, TrainConfig
from ..models import ModelSpec, build_model, get_model
from .sampling import out_of_context, owned_partition, subsample


@dataclass
class Experiment:
    """Everything the algorithms of one run share: data, partition, model and initial weights.

    `devices` are those of the round being run (`enter_round`): with a context schedule, a
    device's classes, and so its data, change over the rounds. A device's data (`data`) are
    index views into the dataset's tensors on the compute device, made when the device is
    first needed: a round's work grows with its participants, not with the number of devices.
    `precision` is what the config's `precision` resolved to on `compute` ("fp32" or "bf16").
    `other` is the label of out-of-context images ("Others", one past the dataset's classes)
    when the run uses them; `others[d]` are device d's out-of-context images (dataset indices).
    """

    cfg: Config
    dataset: Dataset
    partition: Partition
    spec: ModelSpec
    init: State
    schedule: Schedule
    compute: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    other: int | None = None
    others: dict[int, torch.Tensor] = field(default_factory=dict)
    devices: list[DeviceInfo] = field(default_factory=list)
    device_map: dict[int, DeviceInfo] = field(default_factory=dict)
    _on_device: Dataset | None = field(default=None, repr=False)
    _contexts: tuple[int, ...] = field(default=(), repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def setup(cls, cfg: Config, dataset: Dataset | None = None) -> Experiment:
        """Load the data, split it, and draw the initial weights from `cfg.seed`."""
        try:
            compute = resolve_device(cfg.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        ds = dataset or dataset_of(cfg)
        if cfg.test_fraction < 1:
            test = subsample(ds.test_y, cfg.test_fraction, cfg.seed)
            ds = replace(ds, test_x=ds.test_x[test], test_y=ds.test_y[test])
        extra = gains(cfg.context, cfg.devices, ds.num_classes)
        if ds.owners is not None:  # the devices' own images (Flower nodes): kept as they are
            kept = torch.arange(len(ds.train_y))
            part = owned_partition(ds.owners, ds.train_y, cfg.devices, ds.num_classes,
                                   cfg.seed)
        else:
            kept = subsample(ds.train_y, cfg.data_fraction, cfg.seed)
            part = make_partition(ds.train_y[kept], cfg.partition.scheme, cfg.devices,
                                  cfg.seed, k=cfg.partition.k, alpha=cfg.partition.alpha)
            if extra:
                part = share_classes(part, ds.train_y[kept], extra, cfg.seed)
            # Partition indices refer to the subsample; store them as indices into the dataset.
            part.indices = [kept[torch.tensor(ix, dtype=torch.long)].tolist()
                            for ix in part.indices]
        if cfg.validation_fraction:
            part, val = hold_out(part, ds.train_y, cfg.validation_fraction, cfg.seed)
            val = torch.from_numpy(val)
            kept = kept[~torch.isin(kept, val)]  # never anyone's training image
            if cfg.eval_split == "validation":
                ds = replace(ds, test_x=ds.train_x[val], test_y=ds.train_y[val])
        schedule = Schedule([set(part.classes(d)) for d in range(part.num_devices)],
                            cfg.context)
        schedule.check()
        # With a schedule the model starts with the classes of round 1 (New Class later).
        first = schedule.model_classes(1) if cfg.context else tuple(range(ds.num_classes))
        spec = get_model(cfg.model, len(first), ds.input_shape, cfg.batch_norm, cfg.width)
        if cfg.context:
            spec = spec.replace_layers(list(spec.layers), first)
        torch.manual_seed(cfg.seed)
        init = {k: v.clone() for k, v in build_model(spec).state_dict().items()}
        others_path = any(ALGORITHMS[a].answers_others(cfg.options_of(a))
                          for a in cfg.algorithms)
        other = ds.num_classes if others_path or cfg.partition.other_fraction else None
        others = out_of_context(ds.train_y, kept, schedule.held, list(map(len, part.indices)),
                                cfg.partition.other_fraction, cfg.seed)
        exp = cls(cfg, ds, part, spec, init, schedule, compute,
                  resolve_precision(cfg.precision, compute), other, others)
        exp.enter_round(1)
        return exp

    @property
    def label_space(self) -> int:
        """Number of labels devices count samples over: the classes, plus Others if used."""
        return self.dataset.num_classes + (self.other is not None)

    @property
    def on_device(self) -> Dataset:
        """The dataset with its tensors on the compute device, in the model's memory format
        (moved there once)."""
        if self._on_device is None:
            self._on_device = to_compute(self.dataset, self.compute,
                                         memory_format(self.precision))
        return self._on_device

    def enter_round(self, rnd: int) -> None:
        """Set `devices` to round `rnd`'s contexts (recomputed only when they change)."""
        contexts = self.schedule.rounds_until(rnd)
        if self.devices and contexts == self._contexts:
            return
        self._contexts = contexts
        part = self.partition
        self.devices = []
        for d in range(part.num_devices):
            ctx = set(self.schedule.context(d, rnd))
            counts = [n if c in ctx else 0 for c, n in enumerate(part.class_counts[d])]
            self.devices.append(DeviceInfo(d, tuple(counts)))
        self.device_map = {d.id: d for d in self.devices}

    def holding(self) -> list[int]:
        """The devices with images in the current round (with nodes' own images, a device
        holds none until its node reports them)."""
        return [d.id for d in self.devices if d.classes]

    def admit(self, device: int, dataset: Dataset) -> None:
        """Device `device`, which held no images, brought its own late: `dataset` is this
        experiment's with the device's training images appended (`own_data.with_reports`).
        ValueError if the device held images already or `dataset` is not this one grown
        (`dataset`'s test set is not used: this experiment keeps its own)."""
        start = len(self.dataset.train_y)
        if self.partition.indices[device] or dataset.owners is None or not torch.equal(
                dataset.train_y[:start], self.dataset.train_y):
            raise ValueError(f"device {device}: admit takes a device without images, into "
                             "the same dataset with its images appended")
        counts = torch.bincount(dataset.train_y[start:], minlength=self.partition.num_classes)
        self.partition.indices[device] = list(range(start, len(dataset.train_y)))
        self.partition.class_counts[device] = counts.tolist()
        part = self.partition
        self.schedule = Schedule([set(part.classes(d)) for d in range(part.num_devices)],
                                 self.cfg.context)
        self.dataset = replace(self.dataset, train_x=dataset.train_x,
                               train_y=dataset.train_y, owners=dataset.owners)
        self.devices, self._on_device, self._cache = [], None, {}  # recomputed when needed

    def data(self, device: int) -> DeviceData:
        """A device's data in the current round (`POOLED`: every device's, for `central`)."""
        classes = self.devices[device].classes if device != POOLED else self._contexts
        key = (device, classes)
        if key not in self._cache:
            self._cache[key] = self.data_of(self.on_device, self._indices(device),
                                            self.others.get(device), self.other)
        return self._cache[key]

    def _indices(self, device: int) -> torch.Tensor:
        """Dataset indices of the device's in-context training images (all devices' for
        `POOLED`), sorted."""
        if device == POOLED:
            return torch.cat([self._indices(d) for d in range(len(self.devices))]).sort().values
        idx = torch.tensor(self.partition.indices[device], dtype=torch.long)
        return idx[torch.isin(self.dataset.train_y[idx],
                              torch.tensor(self.devices[device].classes))]

    @staticmethod
    def data_of(ds: Dataset, idx: torch.Tensor, other_idx: torch.Tensor | None = None,
                other: int | None = None) -> DeviceData:
        """The training samples `idx` of `ds` as one device's data (a view: `ds`'s tensors
        and an index); with `other_idx`, those images too, labelled `other`
        (out-of-context images)."""
        space = ds.num_classes + (other is not None)
        x, y = ds.train_x, ds.train_y
        idx = idx.to(y.device)
        if other_idx is not None and len(other_idx):
            # Out-of-context images carry another label than in the dataset: a copy of them.
            o = other_idx.to(y.device)
            x = torch.cat([x[idx], x[o]])
            y = torch.cat([y[idx], torch.full((len(o),), other, dtype=torch.long,
                                               device=y.device)])
            return DeviceData(x, y, space, ds.mean, ds.std, ds.crop_padding, ds.flip)
        return DeviceData(x, y, space, ds.mean, ds.std, ds.crop_padding, ds.flip, index=idx)

    def train_config(self, cfg: Config | None = None) -> TrainConfig:
        """The base device training settings of `cfg` (default: this experiment's)."""
        cfg = cfg or self.cfg
        return replace(cfg.train, seed=cfg.seed, precision=self.precision)

    def strategy(self, name: str) -> Strategy:
        """A fresh strategy of algorithm `name` on this experiment, with its own settings
        and overrides (ConfigError if they do not fit the model)."""
        cfg = self.cfg.for_algorithm(name)
        robust = Robustness(cfg.aggregation.rule, cfg.aggregation.trim, cfg.aggregation.clip)
        setting = Setting(self.spec, self.train_config(cfg), self.devices, cfg.bn, robust,
                          self.other, self.init)
        try:
            return ALGORITHMS[name].from_setting(setting, cfg.options_of(name))
        except ValueError as exc:  # e.g. a depth the model cannot take, a bad checkpoint
            raise ConfigError(f"{name}: {exc}") from None

    def runtime(self, store_dir: Path | None = None) -> Runtime:
        """The device side for one algorithm: this experiment's data, and a store of what
        devices keep (spilled to `store_dir` past the memory budget)."""
        store = DeviceStore(store_dir, self.cfg.store_memory_mb << 20)
        return Runtime(self.data, store, self.cfg.batch_devices)
