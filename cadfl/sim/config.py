"""The run configuration: one validated object from a TOML file plus `--set key=value` overrides.

Every field has a type and an allowed range; a bad value fails before any work starts, with the
field's dotted name and what is allowed. The defaults are the embedded demo (digits, 10 devices
x 5 classes, a few dozen rounds): `cadfl run` with no config runs it.
"""

from __future__ import annotations

import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ..runtime.compute import DEVICE_PATTERN

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type or out of range."""


@dataclass
class PartitionConfig:
    """How training data is split over devices."""

    scheme: str = "classes"  # iid | classes | dirichlet
    k: int = 5  # classes per device (scheme "classes")
    alpha: float = 0.5  # Dirichlet concentration (scheme "dirichlet")
    other_fraction: float = 0.0  # out-of-context images per device, as a share of its own


@dataclass
class TrainSection:
    """Local training on each device."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True


@dataclass
class FedProxConfig:
    """FedProx's proximal strength."""

    mu: float = 0.01


@dataclass
class AggregationConfig:
    """How the cloud combines the holders of each parameter (robust rules for hostile devices)."""

    rule: str = "mean"  # mean | median | trimmed_mean
    trim: float = 0.1  # trimmed_mean: share of the lowest and of the highest values dropped
    clip: float = 0.0  # > 0: scale every update down to at most this L2 norm first


@dataclass
class FaultsConfig:
    """Seeded faults injected in simulation (probabilities per device and round)."""

    dropout: float = 0.0  # the device never answers
    straggler: float = 0.0  # the device does only a random part of its local steps
    corrupt: float = 0.0  # the device returns NaNs or a tensor of the wrong shape
    byzantine: float = 0.0  # the device sends its update sign-flipped or scaled by 10


@dataclass
class CadConfig:
    """CAD and Fed2: where class paths start and how filters are assigned to classes."""

    depth: int | str = 1  # decoupled conv layers from the end (0: classifier only), or "auto"
    assign: str = "prior"  # prior: equal groups fixed at init; activation: the paper's way
    warmup_rounds: int = 0  # activation: rounds of dense FedAvg before decoupling
    checkpoint: str = ""  # activation: dense weights (.safetensors) to decouple instead
    others: bool = False  # an "Others" path and logit: "none of my classes"
    selectivity_threshold: float = 0.3  # depth "auto": decouple from the first conv layer
    # whose class selectivity reaches this


@dataclass
class SyntheticConfig:
    """The generated `synthetic` dataset (dataset = "synthetic"): sizes and its own seed."""

    images: int = 200_000  # training images (enough for 10,000 devices x 5 classes)
    test_images: int = 2_000
    classes: int = 10
    channels: int = 1
    size: int = 8  # images are size x size
    seed: int = 0


@dataclass
class ContextChange:
    """From `round` on, `devices` (empty: every device) gain the classes `add` and lose the
    classes `remove`. A class whose first change on a device adds it counts as not yet seen
    there before that round; a class no device has seen yet is new to the global model
    (New Class). A device gaining a class it has no images of gets a share of that class's
    images (`cadfl.data.partition.share_classes`)."""

    round: int = 1
    devices: list[int] = field(default_factory=list)
    add: list[int] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)


@dataclass
class Config:
    """A whole experiment: data, model, devices, algorithms compared side by side, and rounds.

    `sample` is a fraction of devices per round when a float in (0, 1], a number of devices
    when an integer. `data_fraction` keeps that share of every class's training images (for
    quick CPU-scale runs); `test_fraction` likewise of the test images (cheaper evaluation,
    same share of every class). `bn` is "average" or "keep_local" (batch-norm statistics).
    `context` lists changes of devices' class sets over the rounds (`ContextChange`).
    A round with fewer than `min_devices` valid updates keeps the previous global state.
    On Flower, a device that has not answered `round_deadline` seconds after its payload was
    sent counts as a dropout.

    The runtime: `device` is where device models train and are scored ("auto": CUDA when
    torch sees a GPU, else "cpu"; or "cpu", "cuda", "cuda:N"); `batch_devices` > 1 trains up
    to that many same-shape device models at once; what devices keep between rounds stays in
    memory up to `store_memory_mb` and spills to the run directory beyond; `eval_devices` > 0
    scores per-device models (local, kept statistics) on a seeded sample of that many devices
    per evaluation instead of all.
    """

    dataset: str = "digits"
    data_dir: str = ""
    model: str = "digits_cnn"
    batch_norm: bool = True
    devices: int = 10
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    rounds: int = 30
    algorithms: list[str] = field(
        default_factory=lambda: ["cad", "fed2", "fedavg", "fedprox", "local"])
    seed: int = 0
    sample: int | float = 1.0
    eval_every: int = 1
    target_acc: float = 0.8
    data_fraction: float = 1.0
    test_fraction: float = 1.0
    bn: str = "average"
    min_devices: int = 1
    round_deadline: float = 600.0
    train: TrainSection = field(default_factory=TrainSection)
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)
    cad: CadConfig = field(default_factory=CadConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    context: list[ContextChange] = field(default_factory=list)
    device: str = "auto"
    batch_devices: int = 1
    store_memory_mb: int = 512
    eval_devices: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what is written to the run directory)."""
        return asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML text."""
        return tomli_w.dumps(self.to_dict())

    def sampled_per_round(self) -> int:
        """How many devices take part in a round."""
        if isinstance(self.sample, int) and not isinstance(self.sample, bool):
            return min(self.sample, self.devices)
        return max(1, round(self.sample * self.devices))


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Return `value` converted to `hint` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {hint}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
        return value
    if is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table of settings, got {value!r}")
        return _from_dict(hint, value, prefix=f"{name}.")
    raise TypeError(f"unsupported config type {hint}")  # a programming error, not a user one


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + u for u in unknown)}; "
                          f"valid: {', '.join(prefix + n for n in names)}")
    kwargs = {k: _check_type(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def _range(name: str, value: float, low: float, high: float | None = None,
           low_open: bool = False) -> None:
    bad = value <= low if low_open else value < low
    if bad or (high is not None and value > high) or not math.isfinite(value):  # nan, inf
        left = "(" if low_open else "["
        right = f"{high}]" if high is not None else "inf)"
        raise ConfigError(f"{name}: {value!r} is out of range, allowed {left}{low}, {right}")


def validate(cfg: Config) -> Config:
    """Check names and ranges; returns `cfg` or raises ConfigError naming the field."""
    from ..data.datasets import DATASETS
    from ..fl import ALGORITHMS
    from ..models import MODELS

    def one_of(name: str, value: str, valid: typing.Iterable[str]) -> None:
        valid = list(valid)
        if value not in valid:
            raise ConfigError(f"{name}: unknown {value!r}; valid: {', '.join(valid)}")

    one_of("dataset", cfg.dataset, DATASETS)
    one_of("model", cfg.model, MODELS)
    one_of("partition.scheme", cfg.partition.scheme, ("iid", "classes", "dirichlet"))
    one_of("bn", cfg.bn, ("average", "keep_local"))
    if not cfg.algorithms:
        raise ConfigError("algorithms: give at least one algorithm")
    for i, a in enumerate(cfg.algorithms):
        one_of(f"algorithms[{i}]", a, ALGORITHMS)
    if len(set(cfg.algorithms)) != len(cfg.algorithms):
        raise ConfigError(f"algorithms: listed twice in {cfg.algorithms}")
    _range("devices", cfg.devices, 1)
    _range("min_devices", cfg.min_devices, 1)
    _range("round_deadline", cfg.round_deadline, 0, low_open=True)
    _range("rounds", cfg.rounds, 1)
    _range("eval_every", cfg.eval_every, 1)
    _range("seed", cfg.seed, 0)
    _range("partition.k", cfg.partition.k, 1)
    _range("partition.alpha", cfg.partition.alpha, 0, low_open=True)
    _range("partition.other_fraction", cfg.partition.other_fraction, 0, 1)
    for i, change in enumerate(cfg.context):
        _range(f"context[{i}].round", change.round, 1, cfg.rounds)
        for d in change.devices:
            _range(f"context[{i}].devices", d, 0, cfg.devices - 1)
        for c in (*change.add, *change.remove):
            _range(f"context[{i}] class", c, 0)
        both = sorted(set(change.add) & set(change.remove))
        if both:
            raise ConfigError(f"context[{i}]: classes {both} are both added and removed")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ConfigError(f"device: unknown {cfg.device!r}; valid: auto, cpu, cuda, cuda:N")
    _range("batch_devices", cfg.batch_devices, 1)
    _range("store_memory_mb", cfg.store_memory_mb, 0)
    _range("eval_devices", cfg.eval_devices, 0)
    for name in ("images", "test_images", "classes", "channels", "size"):
        _range(f"synthetic.{name}", getattr(cfg.synthetic, name), 1)
    _range("target_acc", cfg.target_acc, 0, 1)
    _range("data_fraction", cfg.data_fraction, 0, 1, low_open=True)
    _range("test_fraction", cfg.test_fraction, 0, 1, low_open=True)
    if cfg.sample < 1 if isinstance(cfg.sample, int) else not 0 < cfg.sample <= 1:
        raise ConfigError(f"sample: {cfg.sample!r} is out of range, allowed a fraction of "
                          "devices in (0, 1] or a whole number of devices >= 1")
    _range("train.epochs", cfg.train.epochs, 1)
    _range("train.batch_size", cfg.train.batch_size, 1)
    _range("train.lr", cfg.train.lr, 0, low_open=True)
    _range("train.momentum", cfg.train.momentum, 0, 1)
    _range("train.weight_decay", cfg.train.weight_decay, 0)
    _range("fedprox.mu", cfg.fedprox.mu, 0)
    if isinstance(cfg.cad.depth, str):
        if cfg.cad.depth != "auto" or cfg.cad.assign != "activation":
            raise ConfigError(f"cad.depth: {cfg.cad.depth!r} is not allowed: give a number of "
                              "conv layers >= 0, or \"auto\" together with "
                              "cad.assign = \"activation\"")
    else:
        _range("cad.depth", cfg.cad.depth, 0)
    one_of("aggregation.rule", cfg.aggregation.rule, ("mean", "median", "trimmed_mean"))
    _range("aggregation.trim", cfg.aggregation.trim, 0, 0.49)
    _range("aggregation.clip", cfg.aggregation.clip, 0)
    for name in ("dropout", "straggler", "corrupt", "byzantine"):
        _range(f"faults.{name}", getattr(cfg.faults, name), 0, 1)
    _range("cad.selectivity_threshold", cfg.cad.selectivity_threshold, 0, 1)
    one_of("cad.assign", cfg.cad.assign, ("prior", "activation"))
    _range("cad.warmup_rounds", cfg.cad.warmup_rounds, 0)
    if cfg.cad.assign == "activation" and not (cfg.cad.warmup_rounds or cfg.cad.checkpoint):
        raise ConfigError("cad.assign='activation' needs a trained model: set "
                          "cad.warmup_rounds >= 1 or cad.checkpoint to a dense .safetensors")
    if cfg.cad.warmup_rounds >= cfg.rounds:
        raise ConfigError(f"cad.warmup_rounds={cfg.cad.warmup_rounds} leaves no CAD rounds: "
                          f"allowed 0 to rounds-1 = {cfg.rounds - 1}")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `--set key=value`: dotted key, TOML value (bare words are taken as strings)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set rounds=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def config_from_dict(data: dict[str, Any]) -> Config:
    """The validated config from a nested dict (e.g. `Config.to_dict()` sent to a device)."""
    return validate(_from_dict(Config, data))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The validated config: defaults, then the TOML file (if any), then the overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return config_from_dict(data)
