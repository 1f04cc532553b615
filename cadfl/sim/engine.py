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
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..data.datasets import Dataset, load_dataset
from ..data.partition import Partition, make_partition, share_classes
from ..fl import ALGORITHMS, Strategy
from ..fl.aggregate import Robustness
from ..fl.central import POOLED
from ..fl.device import DeviceData, accuracy, label_map, predict, run_task
from ..fl.payload import DeviceInfo, Payload, State, TrainConfig, Update, state_bytes
from ..fl.strategy import device_seed
from ..fl.validate import rejection
from ..models import ModelSpec, build_model, get_model
from ..report.plots import plot_curves
from ..report.summary import markdown_table, summarize
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, ConfigError
from .context import Schedule, gains
from .faults import with_faults

log = logging.getLogger("cadfl")
Executor = Callable[[dict[int, Payload]], dict[int, Update]]
EVAL_KEYS = ("global_acc", "context_acc", "test_loss", "class_acc", "others_reject",
             "others_in_acc")
METRIC_KEYS = ("round", "algorithm", "global_acc", "context_acc", "test_loss", "train_loss",
               "bytes_down", "bytes_up", "device_train_flops", "wall_s", "rejected",
               "class_acc", "others_reject", "others_in_acc")


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


def sample_devices(seed: int, rnd: int, num_devices: int, count: int) -> list[int]:
    """This round's participants: the same for every algorithm, independent of history."""
    rng = np.random.default_rng([seed, rnd])
    return sorted(rng.choice(num_devices, size=count, replace=False).tolist())


@dataclass
class Experiment:
    """Everything the algorithms of one run share: data, partition, model and initial weights.

    `devices` and `device_data` are those of the round being run (`enter_round`): with a
    context schedule, a device's classes, and so its data, change over the rounds. `other` is
    the label of out-of-context images ("Others", one past the dataset's classes) when the
    run uses them; `others[d]` are device d's out-of-context images (dataset indices).
    """

    cfg: Config
    dataset: Dataset
    partition: Partition
    spec: ModelSpec
    init: State
    schedule: Schedule
    other: int | None = None
    others: dict[int, torch.Tensor] = field(default_factory=dict)
    devices: list[DeviceInfo] = field(default_factory=list)
    device_data: dict[int, DeviceData] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def setup(cls, cfg: Config, dataset: Dataset | None = None) -> Experiment:
        """Load the data, split it, and draw the initial weights from `cfg.seed`."""
        ds = dataset or load_dataset(cfg.dataset, cfg.data_dir or None)
        if cfg.test_fraction < 1:
            test = subsample(ds.test_y, cfg.test_fraction, cfg.seed)
            ds = replace(ds, test_x=ds.test_x[test], test_y=ds.test_y[test])
        kept = subsample(ds.train_y, cfg.data_fraction, cfg.seed)
        part = make_partition(ds.train_y[kept], cfg.partition.scheme, cfg.devices, cfg.seed,
                              k=cfg.partition.k, alpha=cfg.partition.alpha)
        extra = gains(cfg.context, cfg.devices, ds.num_classes)
        if extra:
            part = share_classes(part, ds.train_y[kept], extra, cfg.seed)
        # Partition indices refer to the subsample; store them as indices into the dataset.
        part.indices = [kept[torch.tensor(ix, dtype=torch.long)].tolist()
                        for ix in part.indices]
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
        other = ds.num_classes if cfg.cad.others or cfg.partition.other_fraction else None
        others = out_of_context(ds.train_y, kept, schedule.held, list(map(len, part.indices)),
                                cfg.partition.other_fraction, cfg.seed)
        exp = cls(cfg, ds, part, spec, init, schedule, other, others)
        exp.enter_round(1)
        return exp

    @property
    def label_space(self) -> int:
        """Number of labels devices count samples over: the classes, plus Others if used."""
        return self.dataset.num_classes + (self.other is not None)

    def enter_round(self, rnd: int) -> None:
        """Set `devices` and `device_data` to round `rnd`'s contexts."""
        ds, part = self.dataset, self.partition
        self.devices, self.device_data, pooled, contexts = [], {}, [], []
        for d in range(part.num_devices):
            ctx = self.schedule.context(d, rnd)
            contexts.append(ctx)
            counts = [n if c in ctx else 0 for c, n in enumerate(part.class_counts[d])]
            self.devices.append(DeviceInfo(d, tuple(counts)))
            idx = torch.tensor(part.indices[d], dtype=torch.long)
            idx = idx[torch.isin(ds.train_y[idx], torch.tensor(ctx))]
            pooled.append(idx)
            key = (d, ctx)
            if key not in self._cache:
                self._cache[key] = self.data_of(ds, idx, self.others.get(d), self.other)
            self.device_data[d] = self._cache[key]
        key = (POOLED, tuple(contexts))
        if key not in self._cache:
            self._cache[key] = self.data_of(ds, torch.cat(pooled).sort().values, None, self.other)
        self.device_data[POOLED] = self._cache[key]

    @staticmethod
    def data_of(ds: Dataset, idx: torch.Tensor, other_idx: torch.Tensor | None = None,
                other: int | None = None) -> DeviceData:
        """The training samples `idx` of `ds` as one device's data; with `other_idx`, those
        images too, labelled `other` (out-of-context images)."""
        x, y = ds.train_x[idx], ds.train_y[idx]
        if other_idx is not None and len(other_idx):
            x = torch.cat([x, ds.train_x[other_idx]])
            y = torch.cat([y, torch.full((len(other_idx),), other, dtype=torch.long)])
        space = ds.num_classes + (other is not None)
        return DeviceData(x, y, space, ds.mean, ds.std, ds.crop_padding, ds.flip)

    def train_config(self) -> TrainConfig:
        """The base device training settings of this config."""
        t = self.cfg.train
        return TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                           momentum=t.momentum, weight_decay=t.weight_decay, seed=self.cfg.seed,
                           augment=t.augment)

    def strategy(self, name: str) -> Strategy:
        """A fresh strategy of algorithm `name` on this experiment."""
        cfg = self.cfg
        pretrained = load_pretrained(cfg.cad.checkpoint, self.init) if cfg.cad.checkpoint else None
        cad = {"depth": cfg.cad.depth, "assign": cfg.cad.assign,
               "warmup_rounds": cfg.cad.warmup_rounds, "pretrained": pretrained,
               "selectivity_threshold": cfg.cad.selectivity_threshold,
               "others": self.other if cfg.cad.others else None}
        options = {"fedprox": {"mu": cfg.fedprox.mu}, "cad": cad, "fed2": cad}
        robust = Robustness(cfg.aggregation.rule, cfg.aggregation.trim, cfg.aggregation.clip)
        return ALGORITHMS[name](self.spec, self.train_config(), self.devices, bn=cfg.bn,
                                robust=robust, **options.get(name, {}))

    def run_here(self, payloads: dict[int, Payload]) -> dict[int, Update]:
        """Execute payloads in this process, one device after another (ascending id)."""
        return {d: run_task(p, self.device_data[d]) for d, p in sorted(payloads.items())}

    def screen(self, rnd: int, payloads: dict[int, Payload], answers: dict[int, Update]
               ) -> tuple[dict[int, Update], int]:
        """The valid answers, and how many payloads got none or an invalid one (logged with
        the device and the reason)."""
        valid, rejected = {}, 0
        for d, p in sorted(payloads.items()):
            u = answers.get(d)
            reason = "no answer" if u is None else rejection(
                p, u, self.label_space, len(self.device_data[d].y))
            if reason:
                log.warning("round %d: update of device %d rejected: %s", rnd, d, reason)
                rejected += 1
            else:
                valid[d] = u
        return valid, rejected

    def train_round(self, strategy: Strategy, rnd: int, state: State,
                    execute: Executor | None = None) -> tuple[State, dict[str, float]]:
        """One round: configure, train every participant, aggregate; returns the new state.

        `execute` runs payloads on their devices and returns the updates (default: here, in
        this process; the Flower adapter sends them to Flower nodes instead).
        """
        cfg = self.cfg
        start = time.perf_counter()
        self.enter_round(rnd)
        strategy.devices = {d.id: d for d in self.devices}
        state = strategy.add_classes(state, self.schedule.model_classes(rnd),
                                     device_seed(cfg.seed, rnd, -2))
        ids = sample_devices(cfg.seed, rnd, cfg.devices, cfg.sampled_per_round())
        execute = with_faults(execute or self.run_here, cfg.faults, cfg.seed, rnd)
        queries = strategy.configure_query(rnd, state, [d.id for d in self.devices])
        replies, rejected_q = self.screen(rnd, queries, execute(queries) if queries else {})
        if replies:
            state = strategy.aggregate_query(rnd, state, replies)
        payloads = strategy.configure_train(rnd, state, ids)
        updates, rejected = self.screen(rnd, payloads, execute(payloads))
        if len(updates) >= min(cfg.min_devices, len(payloads)):
            state = strategy.aggregate_train(rnd, state, updates)
        else:
            log.warning("round %d: %d valid update(s), fewer than min_devices=%d: the global "
                        "state is kept", rnd, len(updates), cfg.min_devices)
        n = max(1, len(updates))
        comm = strategy.communicates
        # Statistics queries are traffic too: spread over this round's participants.
        down = [p.state for p in [*queries.values(), *payloads.values()]]
        up = [u.state for u in [*replies.values(), *updates.values()]]
        stats = {
            "train_loss": sum(u.metrics["train_loss"] * u.num_samples for u in updates.values())
            / max(1, sum(u.num_samples for u in updates.values())),
            "bytes_down": sum(map(state_bytes, down)) / n if comm else 0,
            "bytes_up": sum(map(state_bytes, up)) / n if comm else 0,
            "device_train_flops": sum(u.metrics["train_flops"] for u in updates.values()) / n,
            "rejected": rejected + rejected_q,
            "wall_s": time.perf_counter() - start,
        }
        return state, stats

    def evaluate(self, strategy: Strategy, rnd: int, state: State) -> dict[str, float | None]:
        """Scores of round `rnd` (keys `EVAL_KEYS`).

        Of the cloud's model: global_acc, class_acc (per class) and test_loss, the argmax over
        its classes without Others (a class it does not know yet counts as wrong). Over ALL
        devices: context_acc, each device's accuracy within its own classes; with an Others
        output, others_reject (share of out-of-context test images a device answers "Others")
        and others_in_acc (accuracy on its own classes with "Others" among the answers).
        """
        ds = self.dataset
        out: dict = dict.fromkeys(EVAL_KEYS)
        model = strategy.global_model(state)
        logits = None
        if model is not None:
            spec, weights = model
            logits = predict(spec, weights, ds.test_x, ds.mean, ds.std)
            out.update(global_scores(logits, ds.test_y, spec, self.other, ds.num_classes))
        scores = []
        if logits is not None and strategy.device_model_is_global():
            # One pass of the global model scores every device: restrict the argmax per device.
            scores = [context_scores(logits, ds.test_y, spec, d.classes, self.other)
                      for d in self.devices]
        else:
            ids = [d.id for d in self.devices]
            for d, p in sorted(strategy.configure_evaluate(rnd, state, ids).items()):
                classes = self.devices[d].classes
                mask = torch.isin(ds.test_y, torch.tensor(classes))
                if self.other in p.spec.class_ids:  # rejection needs the other images too
                    mask[:] = True
                lg = predict(p.spec, p.state, ds.test_x[mask], ds.mean, ds.std)
                scores.append(context_scores(lg, ds.test_y[mask], p.spec, classes, self.other))
        acc, reject, inside = zip(*scores, strict=True)
        out["context_acc"] = float(np.nanmean(acc))
        if not all(math.isnan(r) for r in reject):
            out["others_reject"] = float(np.nanmean(reject))
            out["others_in_acc"] = float(np.nanmean(inside))
        return out


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


def load_pretrained(path: str, like: State) -> State:
    """Dense weights from a safetensors checkpoint (e.g. a run's checkpoints/fedavg.safetensors),
    checked against the model's own state: same keys, same shapes."""
    try:
        weights = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"cad.checkpoint: cannot read {path}: {exc}") from None
    bad = sorted(k for k in like if k not in weights or weights[k].shape != like[k].shape)
    if bad:
        raise ConfigError(f"cad.checkpoint: {path} does not hold this model's weights "
                          f"(missing or differently shaped: {', '.join(bad[:3])})")
    return {k: weights[k] for k in like}


def _round_line(algorithm: str, rnd: int, stats: dict, evals: dict) -> dict:
    line = {"round": rnd, "algorithm": algorithm, **stats, **(evals or dict.fromkeys(EVAL_KEYS))}
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
                   execute: Executor | None = None) -> list[dict]:
    """Run every algorithm of `cfg` into run directory `out`; returns all metric lines.

    `execute` runs each round's payloads on the devices (default: in this process).

    With `resume`, algorithms continue from their last checkpoint, and metric lines written
    after that checkpoint are dropped, so the result equals an uninterrupted run.
    """
    set_threads()
    out.mkdir(parents=True, exist_ok=True)
    exp = Experiment.setup(cfg, dataset)
    (out / "config.toml").write_text(cfg.to_toml())
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
    for a in cfg.algorithms:
        strategy = exp.strategy(a)
        state = strategy.initial_state(exp.init)
        if done.get(a):
            state = load_checkpoint(ckpt_dir, a)[0]
        bar = tqdm(range(done.get(a, 0) + 1, cfg.rounds + 1), desc=f"{a:>8}", unit="round",
                   disable=quiet, initial=done.get(a, 0), total=cfg.rounds)
        for rnd in bar:
            state, stats = exp.train_round(strategy, rnd, state, execute)
            evals = None
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                evals = exp.evaluate(strategy, rnd, state)
                bar.set_postfix({k: f"{v:.3f}" for k, v in evals.items()
                                 if k.endswith("acc") and isinstance(v, float)})
            line = _round_line(a, rnd, stats, evals)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            model = strategy.global_model(state)
            save_checkpoint(ckpt_dir, a, state, {
                "algorithm": a, "round": rnd, "dataset": cfg.dataset,
                "spec": model[0].to_dict() if model else None})
            if strategy.notes:
                (out / f"notes-{a}.json").write_text(json.dumps(strategy.notes, indent=1))
            lines.append(line)
            if on_round:
                on_round(line)
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
    plot_curves(lines, out / "curves.png", title)
    return rows
