"""The in-process simulation engine: devices trained one after another on shared tensors.

One `Experiment` holds the data, the partition and the initial weights; every algorithm of
the config runs on exactly those, round after round, and each round appends one JSON line to
`metrics.jsonl`. Deterministic for a seed: no Ray, no ports, no worker processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..data.augment import to_float
from ..data.context import Schedule, gains
from ..data.datasets import Dataset, load_dataset
from ..data.partition import Partition, hold_out, make_partition, share_classes
from ..device.compute import resolve_device, to_compute
from ..device.executor import Executor, Result, Runtime
from ..device.precision import autocast, memory_format, resolve_precision
from ..device.store import DeviceStore
from ..device.train import EVAL_BATCH, DeviceData, accuracy, label_map, load_model, predict
from ..fl import ALGORITHMS, Setting, Strategy
from ..fl.aggregate import Robustness
from ..fl.central import POOLED
from ..fl.payload import DeviceInfo, Payload, State, TrainConfig, Update, state_bytes
from ..fl.strategy import device_seed
from ..fl.validate import rejection
from ..models import ModelSpec, build_model, get_model
from ..report.summary import markdown_table, summarize
from .checkpoint import load_checkpoint, save_checkpoint
from .faults import with_faults

log = logging.getLogger("cadfl")
# Scores devices' own models where they are: (device, payload) in, (device, the
# `context_scores` of that device) out, for the devices that answered.
DeviceScorer = Callable[[Iterable[tuple[int, Payload]]],
                        Iterator[tuple[int, tuple[float, float, float]]]]
EVAL_KEYS = ("global_acc", "context_acc", "eval_devices", "test_loss", "class_acc",
             "others_reject", "others_in_acc")
METRIC_KEYS = ("round", "algorithm", "global_acc", "context_acc", "eval_devices", "test_loss",
               "train_loss", "bytes_down", "bytes_up", "device_train_flops", "wall_s",
               "rejected", "class_acc", "others_reject", "others_in_acc", "precision")


def set_threads() -> int:
    """Use every core this process may run on, unless OMP_NUM_THREADS says otherwise (torch
    already applied it at import); returns the count."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, n or 1))
    return torch.get_num_threads()


def subsample(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices keeping `fraction` of every class (at least one image each), seeded, sorted."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.permutation(idx)[: max(1, math.ceil(fraction * len(idx)))])
    return torch.from_numpy(np.sort(np.concatenate(keep)))


def out_of_context(labels: torch.Tensor, kept: torch.Tensor, held: list[set[int]],
                   sizes: list[int], fraction: float, seed: int) -> dict[int, torch.Tensor]:
    """Each device's out-of-context images: `fraction` times its image count, drawn (seeded)
    from the kept training images `kept` of classes it never holds."""
    out = {}
    for d, classes in enumerate(held):
        if not fraction:
            break
        pool = kept[~torch.isin(labels[kept], torch.tensor(sorted(classes)))]
        n = min(len(pool), round(fraction * sizes[d]))
        pick = np.random.default_rng([seed, 2, d]).choice(len(pool), n, replace=False)
        out[d] = pool[torch.from_numpy(np.sort(pick))]
    return out


def run_dataset(cfg: Config) -> Dataset:
    """The dataset `cfg` names, its loader's options from `[synthetic]` or `[folder]`."""
    options = {"synthetic": cfg.synthetic, "folder": cfg.folder}.get(cfg.dataset)
    return load_dataset(cfg.dataset, cfg.data_dir or None, **(asdict(options) if options else {}))


def owned_partition(owners: torch.Tensor, labels: torch.Tensor, num_devices: int,
                    num_classes: int, seed: int) -> Partition:
    """The partition of a dataset that comes split by device: device d holds the images
    whose owner is d. A device may hold none yet (a Flower node that has not reported its
    images: `Experiment.admit` takes them in when it does); ConfigError for images owned by a
    device the config does not have."""
    indices = [torch.nonzero(owners == d).flatten() for d in range(num_devices)]
    outside = sorted(set(owners.tolist()) - set(range(num_devices)))
    if outside:
        raise ConfigError(f"devices: the config has {num_devices} (0..{num_devices - 1}), "
                          f"the dataset has images of devices {outside}")
    counts = [torch.bincount(labels[ix], minlength=num_classes).tolist() for ix in indices]
    return Partition("own", seed, num_classes, {}, [ix.tolist() for ix in indices], counts)


def sample_devices(seed: int, rnd: int, pool: Sequence[int], count: int) -> list[int]:
    """This round's participants, `count` (at most all) of the devices in `pool`: the same
    for every algorithm, independent of history."""
    rng = np.random.default_rng([seed, rnd])
    return sorted(rng.choice(np.asarray(pool, dtype=np.int64), size=min(count, len(pool)),
                             replace=False).tolist())


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
        ds = dataset or run_dataset(cfg)
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
        spec = get_model(cfg.model, len(first), ds.input_shape, cfg.batch_norm)
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
        t = cfg.train
        return TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                           momentum=t.momentum, weight_decay=t.weight_decay, seed=cfg.seed,
                           augment=t.augment, precision=self.precision)

    def strategy(self, name: str) -> Strategy:
        """A fresh strategy of algorithm `name` on this experiment, with its own settings
        and overrides (ConfigError if they do not fit the model)."""
        cfg = self.cfg.for_algorithm(name)
        robust = Robustness(cfg.aggregation.rule, cfg.aggregation.trim, cfg.aggregation.clip)
        setting = Setting(self.spec, self.train_config(cfg), self.devices, cfg.bn, robust,
                          self.other, self.init, cfg.options)
        try:
            return ALGORITHMS[name].from_setting(setting, cfg.options_of(name))
        except ValueError as exc:  # e.g. a depth the model cannot take, a bad checkpoint
            raise ConfigError(f"{name}: {exc}") from None

    def runtime(self, store_dir: Path | None = None) -> Runtime:
        """The device side for one algorithm: this experiment's data, and a store of what
        devices keep (spilled to `store_dir` past the memory budget)."""
        store = DeviceStore(store_dir, self.cfg.store_memory_mb << 20)
        return Runtime(self.data, store, self.cfg.batch_devices)

    def screen(self, rnd: int, results: Iterable[Result], tally: Tally
               ) -> Iterator[tuple[int, Update]]:
        """The valid answers, as they arrive; a payload with no answer or an invalid one is
        logged with the device and the reason, and counted in `tally`."""
        for d, p, u in results:
            tally.sent(p)
            reason = "no answer" if u is None else rejection(
                p, u, self.label_space, len(self.data(d)))
            if reason:
                log.warning("round %d: update of device %d rejected: %s", rnd, d, reason)
                tally.rejected += 1
            else:
                tally.received(u)
                yield d, u

    def train_round(self, strategy: Strategy, rnd: int, state: State,
                    execute: Executor | None = None) -> tuple[State, dict[str, float]]:
        """One round: configure, train every participant, aggregate; returns the new state.

        Payloads are made, trained and folded into the aggregate one device (or one batch of
        devices) at a time. `execute` runs payloads on their devices and yields the updates
        (default: a fresh in-process runtime; the engine passes its own, and the Flower
        adapter one that sends them to Flower nodes).
        """
        cfg = self.cfg
        start = time.perf_counter()
        # A deployment samples from the devices that can be reached now (its executor
        # knows which, and may admit a device that brought its own images late); in process
        # every device can.
        reachable = getattr(execute, "reachable", None)
        pool = reachable() if reachable else range(cfg.devices)
        self.enter_round(rnd)
        ids = sample_devices(cfg.seed, rnd, [d for d in pool if self.devices[d].classes],
                             cfg.sampled_per_round())
        strategy.devices = self.device_map
        state = strategy.add_classes(state, self.schedule.model_classes(rnd),
                                     device_seed(cfg.seed, rnd, -2))
        execute = with_faults(execute or self.runtime(), cfg.faults, cfg.seed, rnd)
        tally = Tally()
        queries = strategy.configure_query(rnd, state, self.holding())
        if queries:
            replies = dict(self.screen(rnd, execute(sorted(queries.items())), tally))
            if replies:
                state = strategy.aggregate_query(rnd, state, replies)
        tally.start_training()
        updates = self.screen(rnd, execute(strategy.configure_train(rnd, state, ids)), tally)
        merged = strategy.aggregate_train(rnd, state, updates)
        for _ in updates:  # a strategy that stopped early still trains every participant
            pass
        if tally.valid >= min(cfg.min_devices, tally.payloads):
            state = merged
        else:
            log.warning("round %d: %d valid update(s), fewer than min_devices=%d: the global "
                        "state is kept", rnd, tally.valid, cfg.min_devices)
        return state, tally.stats(strategy.communicates, time.perf_counter() - start)

    def evaluation_devices(self, rnd: int) -> list[int]:
        """The devices whose own models are scored: all, or a seeded sample of
        `eval_devices` of them."""
        holding = self.holding()
        if not self.cfg.eval_devices or self.cfg.eval_devices >= len(holding):
            return holding
        rng = np.random.default_rng([self.cfg.seed, rnd, 0xE7A1])
        return sorted(rng.choice(np.asarray(holding, dtype=np.int64),
                                 size=self.cfg.eval_devices, replace=False).tolist())

    def evaluate(self, strategy: Strategy, rnd: int, state: State,
                 runtime: Runtime | None = None, score: DeviceScorer | None = None
                 ) -> dict[str, float | None]:
        """Scores of round `rnd` (keys `EVAL_KEYS`).

        Of the cloud's model: global_acc, class_acc (per class) and test_loss, the argmax over
        its classes without Others (a class it does not know yet counts as wrong). Over the
        devices: context_acc, each device's accuracy within its own classes (`eval_devices`:
        how many were scored); with an Others output, others_reject (share of out-of-context
        test images a device answers "Others") and others_in_acc (accuracy on its own classes
        with "Others" among the answers). When every device's model is the global one
        restricted to its classes, one pass of the global model scores all devices;
        otherwise each sampled device's own model (with what it keeps) is run: here, or by
        `score` where the devices keep their state themselves (Flower nodes); a device that
        does not answer `score` is left out of the mean.
        """
        ds, test_x = self.dataset, self.on_device.test_x
        runtime = runtime or self.runtime()
        out: dict = dict.fromkeys(EVAL_KEYS)
        model = strategy.global_model(state)
        logits = None
        if model is not None:
            spec, weights = model
            logits = predict(spec, weights, test_x, ds.mean, ds.std, precision=self.precision)
            out.update(global_scores(logits, ds.test_y, spec, self.other, ds.num_classes))
        scores = []
        # Devices with images of their own (Flower nodes' own data) score on their own
        # held-out images, never on the server's test set.
        if logits is not None and strategy.device_model_is_global() and ds.owners is None:
            # One pass of the global model scores every device: restrict the argmax per
            # device, once per distinct class set.
            by_classes: dict[tuple[int, ...], tuple[float, float, float]] = {}
            for d in self.devices:
                if d.classes not in by_classes:
                    by_classes[d.classes] = context_scores(logits, ds.test_y, spec, d.classes,
                                                           self.other)
                scores.append(by_classes[d.classes])
        else:
            jobs = strategy.configure_evaluate(rnd, state, self.evaluation_devices(rnd))
            if score is not None:
                scores = [s for _, s in score(jobs)]
            else:
                scores = self.score_devices([(d, p.spec, runtime.own_state(d, p))
                                             for d, p in jobs])
        out["eval_devices"] = len(scores)
        if not scores:  # no device answered
            return out
        acc, reject, inside = zip(*scores, strict=True)
        out["context_acc"] = float(np.nanmean(acc))
        if not all(math.isnan(r) for r in reject):
            out["others_reject"] = float(np.nanmean(reject))
            out["others_in_acc"] = float(np.nanmean(inside))
        return out

    def score_device(self, device: int, spec: ModelSpec, state: State
                     ) -> tuple[float, float, float]:
        """`context_scores` of one device's own model (`spec`, `state`) on the test images
        of its classes in the current round (all test images when it answers Others)."""
        ds, test_x = self.dataset, self.on_device.test_x
        mask = self._scored_images(device, spec)
        logits = predict(spec, state, test_x[mask.to(test_x.device)], ds.mean, ds.std,
                         precision=self.precision)
        return context_scores(logits, ds.test_y[mask], spec, self.devices[device].classes,
                              self.other)

    def score_devices(self, models: list[tuple[int, ModelSpec, State]]
                      ) -> list[tuple[float, float, float]]:
        """`score_device` of every (device, spec, state), in order, with the layers their
        models share computed once: devices whose models have the same layers and the same
        weights in the first of them (FedPer's and FedRep's body) run those layers once over
        the test images, and only their own layers each."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, spec, _) in enumerate(models):
            groups.setdefault((spec.input_shape, spec.layers), []).append(i)
        scores: list[tuple[float, float, float] | None] = [None] * len(models)
        for members in groups.values():
            states = [models[i][2] for i in members]
            spec = models[members[0]][1]
            shared = shared_layers(spec, states) if len(members) > 1 else 0
            if shared == 0:
                for i in members:
                    scores[i] = self.score_device(*models[i])
                continue
            for i, logits in zip(members, self._suffix_logits(
                    spec, shared, [models[i] for i in members]), strict=True):
                device, own_spec, _ = models[i]
                mask = self._scored_images(device, own_spec)
                scores[i] = context_scores(logits, self.dataset.test_y[mask], own_spec,
                                           self.devices[device].classes, self.other)
        return scores  # type: ignore[return-value]

    def _scored_images(self, device: int, spec: ModelSpec) -> torch.Tensor:
        """Mask of the test images a device is scored on: its classes' (all of them when it
        answers Others, whose rejection needs the other images too)."""
        mask = torch.isin(self.dataset.test_y, torch.tensor(self.devices[device].classes))
        if self.other in spec.class_ids:
            mask[:] = True
        return mask

    def _suffix_logits(self, spec: ModelSpec, shared: int,
                       models: list[tuple[int, ModelSpec, State]]) -> list[torch.Tensor]:
        """Each model's logits on its scored images: the first `shared` layers (the same in
        every model) run once per batch of test images, each model's own layers on its rows
        of that batch. Batch by batch, so memory stays that of one batch's activations."""
        ds, test_x = self.dataset, self.on_device.test_x
        dev = test_x.device
        trunk = load_model(spec, models[0][2], dev).eval()[:shared]
        heads = [load_model(spec, state, dev).eval()[shared:]
                 for _, _, state in models]
        masks = [self._scored_images(d, s).to(dev) for d, s, _ in models]
        out: list[list[torch.Tensor]] = [[] for _ in models]
        with torch.inference_mode(), autocast(self.precision, dev):
            for start in range(0, len(test_x), EVAL_BATCH):
                xb = to_float(test_x[start:start + EVAL_BATCH], ds.mean, ds.std)
                features = trunk(xb.contiguous(memory_format=torch.channels_last))
                for head, mask, logits in zip(heads, masks, out, strict=True):
                    rows = mask[start:start + EVAL_BATCH]
                    if rows.any():
                        logits.append(head(features[rows]).float())
        return [torch.cat(parts).cpu() if parts else torch.zeros(0, spec.num_classes)
                for parts in out]


class Tally:
    """What a round sent and received: bytes, losses, FLOPs and rejections.

    Bytes are per device that was sent a payload (statistics queries count as traffic of the
    round); losses and FLOPs are over the valid updates.
    """

    def __init__(self) -> None:
        self.payloads = self.valid = self.rejected = 0
        self.bytes_down = self.bytes_up = 0
        self.samples = 0
        self.loss_sum = self.flops = 0.0
        self._training = False

    def start_training(self) -> None:
        """From now on payloads are training payloads (before: statistics queries)."""
        self._training = True

    def sent(self, payload: Payload) -> None:
        """Count a payload that went to a device."""
        self.bytes_down += state_bytes(payload.state)
        self.payloads += self._training

    def received(self, update: Update) -> None:
        """Count a valid answer."""
        self.bytes_up += state_bytes(update.state)
        if self._training:
            self.valid += 1
            self.samples += update.num_samples
            self.loss_sum += update.metrics["train_loss"] * update.num_samples
            self.flops += update.metrics["train_flops"]

    def stats(self, communicates: bool, wall_s: float) -> dict[str, float]:
        """The round's metric values."""
        sent = max(1, self.payloads)
        return {"train_loss": self.loss_sum / max(1, self.samples),
                "bytes_down": self.bytes_down / sent if communicates else 0,
                "bytes_up": self.bytes_up / sent if communicates else 0,
                "device_train_flops": self.flops / max(1, self.valid),
                "rejected": self.rejected, "wall_s": wall_s}


def shared_layers(spec: ModelSpec, states: Sequence[State]) -> int:
    """How many of the first layers of `spec` have equal tensors in every one of `states`."""
    for i, name in enumerate(spec.names):
        keys = [k for k in states[0] if k.rsplit(".", 1)[0] == name]
        if any(not torch.equal(s[k], states[0][k]) for s in states[1:] for k in keys):
            return i
    return len(spec.names)


def global_scores(logits: torch.Tensor, y: torch.Tensor, spec: ModelSpec, other: int | None,
                  num_classes: int) -> dict:
    """global_acc, class_acc and test_loss of a model's logits on labels `y` (Others left out
    of the argmax; samples of classes the model lacks count as wrong, not in the loss)."""
    ids = torch.tensor(spec.class_ids)
    real = ids != (-1 if other is None else other)
    logits, ids = logits[:, real], ids[real]
    correct = (ids[logits.argmax(1)] == y).float()
    pos = torch.full((max(num_classes, int(ids.max()) + 1),), -1, dtype=torch.long)
    pos[ids] = torch.arange(len(ids))  # class id -> column of `logits`
    known = pos[y] >= 0
    loss = F.cross_entropy(logits[known], pos[y[known]]).item() if known.any() else None
    return {"global_acc": correct.mean().item(), "test_loss": loss,
            "class_acc": [correct[y == c].mean().item() if (y == c).any() else None
                          for c in range(num_classes)]}


def context_scores(logits: torch.Tensor, y: torch.Tensor, spec: ModelSpec,
                   classes: tuple[int, ...], other: int | None) -> tuple[float, float, float]:
    """A device's (context accuracy, Others rejection rate, in-context accuracy with Others
    competing) from its model's logits on labels `y`; the last two are nan without Others."""
    acc = accuracy(logits, y, spec, classes)
    if other not in spec.class_ids:
        return acc, math.nan, math.nan
    answers = (*classes, other)
    pos = label_map(spec, max(*spec.class_ids, *answers) + 1)[torch.tensor(answers)]
    pred = torch.tensor(answers)[logits[:, pos].argmax(1)]
    inside = torch.isin(y, torch.tensor(classes))
    reject = (pred[~inside] == other).float().mean().item() if (~inside).any() else math.nan
    in_acc = (pred[inside] == y[inside]).float().mean().item() if inside.any() else math.nan
    return acc, reject, in_acc


def _round_line(algorithm: str, rnd: int, stats: dict, evals: dict, precision: str) -> dict:
    line = {"round": rnd, "algorithm": algorithm, **stats, **(evals or dict.fromkeys(EVAL_KEYS)),
            "precision": precision}
    return {k: line[k] for k in METRIC_KEYS}


def read_metrics(path: Path) -> list[dict]:
    """All lines of a metrics.jsonl file."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            # A process killed while appending leaves half a last line; its round is redone.
    return out


def run_experiment(cfg: Config, out: Path, resume: bool = False, quiet: bool = False,
                   dataset: Dataset | None = None,
                   on_round: Callable[[dict], None] | None = None,
                   execute: Executor | None = None,
                   experiment: Experiment | None = None) -> list[dict]:
    """Run every algorithm of `cfg` into run directory `out`; returns all metric lines.

    `execute` runs each round's payloads on the devices (default: in this process).
    `experiment` is the set-up experiment to run (default: `Experiment.setup(cfg, dataset)`;
    a Flower executor passes its own, into which devices with their own images join late).

    With `resume`, algorithms continue from their last checkpoint, and metric lines written
    after that checkpoint are dropped, so the result equals an uninterrupted run.
    """
    set_threads()
    out.mkdir(parents=True, exist_ok=True)
    exp = experiment or Experiment.setup(cfg, dataset)
    # What "auto" chose is recorded, so the run directory says how it was computed.
    (out / "config.toml").write_text(replace(cfg, precision=exp.precision).to_toml())
    exp.partition.save(out / "partition.json")
    if not quiet:
        print(exp.partition.summary(exp.dataset.classes))
    metrics_path, ckpt_dir = out / "metrics.jsonl", out / "checkpoints"
    done: dict[str, int] = {}
    if resume:
        for a in cfg.algorithms:
            loaded = load_checkpoint(ckpt_dir, a)
            done[a] = loaded[1]["round"] if loaded else 0
    kept = [m for m in read_metrics(metrics_path) if m["round"] <= done.get(m["algorithm"], 0)]
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    lines = list(kept)
    strategies = {a: exp.strategy(a) for a in cfg.algorithms}  # every setting checked first
    for a, strategy in strategies.items():
        runtime = exp.runtime(out / "devices" / a)
        state = strategy.initial_state(exp.init)
        if done.get(a):
            state, record = load_checkpoint(ckpt_dir, a)
            strategy.restore(record.get("structure") or {})
        runtime.store.resume(done.get(a, 0))
        # Piped into a log, a bar would write a line per update: one line per algorithm then.
        bar = tqdm(range(done.get(a, 0) + 1, cfg.rounds + 1), desc=f"{a:>8}", unit="round",
                   disable=quiet or not sys.stderr.isatty(), initial=done.get(a, 0),
                   total=cfg.rounds)
        for rnd in bar:
            runtime.store.round = rnd
            state, stats = exp.train_round(strategy, rnd, state, execute or runtime)
            evals = None
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                # An executor whose devices keep their own state also scores them.
                evals = exp.evaluate(strategy, rnd, state, runtime,
                                     getattr(execute, "score", None))
                bar.set_postfix({k: f"{v:.3f}" for k, v in evals.items()
                                 if k.endswith("acc") and isinstance(v, float)})
            line = _round_line(a, rnd, stats, evals, exp.precision)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            model = strategy.global_model(state)
            runtime.store.flush(rnd)
            save_checkpoint(ckpt_dir, a, state, {
                "algorithm": a, "round": rnd, "dataset": cfg.dataset,
                "spec": model[0].to_dict() if model else None,
                "structure": strategy.structure()})
            if strategy.notes:
                (out / f"notes-{a}.json").write_text(json.dumps(strategy.notes, indent=1))
            lines.append(line)
            if on_round:
                on_round(line)
        if bar.disable and not quiet:
            last = [m for m in lines if m["algorithm"] == a and m["context_acc"] is not None]
            accs = {k: last[-1][k] for k in ("global_acc", "context_acc")} if last else {}
            print(f"{a:>8}: {cfg.rounds} rounds, " + ", ".join(
                f"{k} {v:.3f}" for k, v in accs.items() if v is not None), flush=True)
    write_report(out, cfg, lines)
    return lines


def write_report(out: Path, cfg: Config, lines: list[dict]) -> list[dict]:
    """summary.md and curves.png of a run directory; returns the summary rows."""
    rows = summarize(lines, cfg.target_acc, cfg.sampled_per_round())
    title = (f"{cfg.dataset} / {cfg.model}: {cfg.devices} devices, partition "
             f"{cfg.partition.scheme}, {cfg.rounds} rounds, seed {cfg.seed}")
    (out / "summary.md").write_text(
        f"# Run summary\n\n{title}; target accuracy {cfg.target_acc}.\n\n"
        f"{markdown_table(rows)}\n\n![curves](curves.png)\n")
    # Imported here: matplotlib is half a second of import that a Flower node, which
    # imports this module for every message it runs, never needs.
    from ..report.plots import plot_curves

    plot_curves(lines, out / "curves.png", title)
    return rows
