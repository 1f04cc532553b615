"""The run configuration: one validated object from a TOML file plus `--set key=value` overrides.

Every field has a type and an allowed range; a bad value fails before any work starts, with the
field's dotted name and what is allowed. The defaults (digits, 10 devices x 5 classes, written
out in configs/digits-10x5.toml) are what every file and override starts from; `cadfl run`
with no config runs the embedded demo, `DEMO`: the mission's cross-device setting. The tables
below the top level are `cadfl.config_tables` and, for `[train]`,
`cadfl.fl.payload.TrainConfig`: each checks its own values.
"""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomli_w

from .checks import check_one_of, check_range
from .config_tables import (
    AggregationConfig,
    ContextChange,
    FaultsConfig,
    FolderConfig,
    PartitionConfig,
    SyntheticConfig,
)
from .data.datasets import Dataset, load_dataset
from .device.compute import check_device_name
from .device.precision import PRECISIONS
from .fl.payload import TrainConfig
from .fl.strategy import BN_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# The embedded demo: what `cadfl run`, `cadfl sweep` and the Flower app run with no config.
DEMO = Path(__file__).with_name("demo.toml")


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type or out of range."""


# What `[overrides.NAME]` may change for one algorithm: how its devices train, and its own
# settings; never the experiment (data, partition, model, rounds, seed) all share.
OVERRIDABLE = ("train",)


# Each algorithm's learning rate on the built-in defaults (10 devices x 5 classes), chosen on
# validation data by `cadfl sweep` (docs/results/sweep-digits: 30 rounds, lr 0.01-0.2; 0.2-0.5
# for the sub-model peers, whose best was at the top of the first grid).
DIGITS_LR = {"cad": 0.02, "fed2": 0.02, "fedavg": 0.02, "fedprox": 0.02, "scaffold": 0.05,
             "fedper": 0.02, "fedrep": 0.05, "ditto": 0.02, "heterofl": 0.5, "fedrolex": 0.5,
             "local": 0.01, "central": 0.01}


def default_options() -> dict[str, Any]:
    """Every registered algorithm's settings at their defaults."""
    from .fl import ALGORITHMS

    return {name: cls.Options() for name, cls in ALGORITHMS.items() if cls.Options is not None}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with the (nested) `changes` applied, tables merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


@dataclass
class Config:
    """A whole experiment: data, model, devices, algorithms compared side by side, and rounds.

    `sample` is a fraction of devices per round when a float in (0, 1], a number of devices
    when an integer. `data_fraction` keeps that share of every class's training images (for
    quick CPU-scale runs); `test_fraction` likewise of the test images (cheaper evaluation,
    same share of every class). `width` is the model's width multiplier (mobilenet_v2 only).
    `bn` is "average" or "keep_local" (batch-norm statistics).
    `context` lists changes of devices' class sets over the rounds (`ContextChange`).
    A round with fewer than `min_devices` valid updates keeps the previous global state.
    On Flower, a device that has not answered `round_deadline` seconds after its payload was
    sent counts as a dropout.

    The runtime: `device` is where device models train and are scored ("auto": CUDA when
    torch sees a GPU, else "cpu"; or "cpu", "cuda", "cuda:N"); `precision` is how devices
    compute there: "fp32", "bf16" (bfloat16 autocast; weights, updates and aggregation stay
    float32) or "auto" (bf16 on a GPU with bf16 or a CPU with AMX / AVX512-BF16, else fp32;
    a run's config.toml records what auto chose); `batch_devices` > 1 trains up
    to that many same-shape device models at once; what devices keep between rounds stays in
    memory up to `store_memory_mb` and spills to the run directory beyond; `eval_devices` > 0
    scores per-device models (local, kept statistics) on a seeded sample of that many devices
    per evaluation instead of all.
    """

    dataset: str = "digits"
    data_dir: str = ""
    model: str = "digits_cnn"
    batch_norm: bool = True
    width: float = 1.0
    devices: int = 10
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    rounds: int = 30
    algorithms: list[str] = field(
        default_factory=lambda: ["cad", "fedavg", "fedper", "fedrolex", "local"])
    seed: int = 0
    sample: int | float = 1.0
    eval_every: int = 1
    target_acc: float = 0.8
    data_fraction: float = 1.0
    test_fraction: float = 1.0
    validation_fraction: float = 0.0
    eval_split: str = "test"
    bn: str = "average"
    min_devices: int = 1
    round_deadline: float = 600.0
    train: TrainConfig = field(default_factory=TrainConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    context: list[ContextChange] = field(default_factory=list)
    device: str = "auto"
    precision: str = "fp32"
    batch_devices: int = 1
    store_memory_mb: int = 512
    eval_devices: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    options: dict[str, Any] = field(default_factory=lambda: default_options())
    overrides: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {a: {"train": {"lr": lr}} for a, lr in DIGITS_LR.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what is written to the run directory): each algorithm's
        settings as its own `[NAME]` table, per-algorithm overrides as `[overrides.NAME]`."""
        data = asdict(self)
        data["train"] = {k: data["train"][k] for k in TrainConfig.SETTINGS}  # the rest: per run
        data.update(data.pop("options"))
        return data

    def options_of(self, algorithm: str) -> Any:
        """The settings of `algorithm` (its `Options` dataclass; None if it takes none)."""
        return self.options.get(algorithm)

    def for_algorithm(self, algorithm: str) -> Config:
        """The config `algorithm` runs with: this one, with its `[overrides.NAME]` applied
        (e.g. its own tuned learning rate)."""
        changes = self.overrides.get(algorithm)
        if not changes:
            return self
        data = self.to_dict()
        data.pop("overrides")
        return config_from_dict(merged(data, changes))

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
    # A class with `SETTINGS` (TrainConfig) takes only those from a file; Config's `options`
    # come from the algorithms' own tables.
    names = getattr(cls, "SETTINGS", None) or [f.name for f in fields(cls) if f.name != "options"]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + u for u in unknown)}; "
                          f"valid: {', '.join(prefix + n for n in names)}")
    kwargs = {k: _check_type(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Check names and ranges; returns `cfg` or raises ConfigError naming the field."""
    try:
        _check(cfg)
    except ValueError as exc:  # each check's message names the field and what is allowed
        raise ConfigError(str(exc)) from None
    return cfg


def _check(cfg: Config) -> None:
    """ValueError naming the first setting of `cfg` that is out of range or unknown."""
    from .data.datasets import DATASETS
    from .fl import ALGORITHMS
    from .models import MODELS
    from .models.zoo import WIDTH_MODELS

    check_one_of("dataset", cfg.dataset, DATASETS)
    check_one_of("model", cfg.model, MODELS)
    check_range("width", cfg.width, 0, 4, low_open=True)
    if cfg.width != 1.0 and cfg.model not in WIDTH_MODELS:
        raise ConfigError(f"width={cfg.width}: model {cfg.model!r} has no width multiplier; "
                          f"models with one: {', '.join(WIDTH_MODELS)}")
    check_one_of("bn", cfg.bn, BN_MODES)
    if not cfg.algorithms:
        raise ConfigError("algorithms: give at least one algorithm")
    for i, a in enumerate(cfg.algorithms):
        check_one_of(f"algorithms[{i}]", a, ALGORITHMS)
    if len(set(cfg.algorithms)) != len(cfg.algorithms):
        raise ConfigError(f"algorithms: listed twice in {cfg.algorithms}")
    check_range("devices", cfg.devices, 1)
    check_range("min_devices", cfg.min_devices, 1)
    check_range("round_deadline", cfg.round_deadline, 0, low_open=True)
    check_range("rounds", cfg.rounds, 1)
    check_range("eval_every", cfg.eval_every, 1)
    check_range("seed", cfg.seed, 0)
    for table in (cfg.partition, cfg.train, cfg.aggregation, cfg.faults, cfg.synthetic,
                  cfg.folder):
        table.check()
    for i, change in enumerate(cfg.context):
        change.check(f"context[{i}]", cfg.rounds, cfg.devices)
    check_device_name(cfg.device)
    check_one_of("precision", cfg.precision, PRECISIONS)
    check_range("batch_devices", cfg.batch_devices, 1)
    check_range("store_memory_mb", cfg.store_memory_mb, 0)
    check_range("eval_devices", cfg.eval_devices, 0)
    check_range("target_acc", cfg.target_acc, 0, 1)
    check_range("data_fraction", cfg.data_fraction, 0, 1, low_open=True)
    check_range("test_fraction", cfg.test_fraction, 0, 1, low_open=True)
    check_range("validation_fraction", cfg.validation_fraction, 0, 0.5)
    check_one_of("eval_split", cfg.eval_split, ("test", "validation"))
    if cfg.eval_split == "validation" and not cfg.validation_fraction:
        raise ConfigError("eval_split: \"validation\" needs validation_fraction > 0 (the "
                          "share of every device's images held out for it)")
    if cfg.sample < 1 if isinstance(cfg.sample, int) else not 0 < cfg.sample <= 1:
        raise ConfigError(f"sample: {cfg.sample!r} is out of range, allowed a fraction of "
                          "devices in (0, 1] or a whole number of devices >= 1")
    for options in cfg.options.values():
        options.check(cfg)
    for name, changes in cfg.overrides.items():
        check_one_of("overrides", name, ALGORITHMS)
        allowed = (*OVERRIDABLE, *([name] if name in cfg.options else []))
        for key in changes:
            check_one_of(f"overrides.{name}", key, allowed)
        cfg.for_algorithm(name)  # its values are checked like any other


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
    """The validated config from a nested dict (e.g. `Config.to_dict()` sent to a device).

    A top-level table named after an algorithm holds that algorithm's settings (its
    `Options`); algorithms not given get their defaults.
    """
    from .fl import ALGORITHMS

    data = dict(data)
    tables = {name: data.pop(name) for name in list(data)
              if name in ALGORITHMS and ALGORITHMS[name].Options is not None}
    overrides = data.pop("overrides", {})  # a file without [overrides.*] tunes nothing
    if not isinstance(overrides, dict) or not all(isinstance(v, dict)
                                                 for v in overrides.values()):
        raise ConfigError("overrides: expected tables [overrides.NAME] of settings, got "
                          f"{overrides!r}")
    cfg = _from_dict(Config, data)
    cfg.options = {name: _check_type(name, tables.get(name, {}), cls.Options)
                   for name, cls in ALGORITHMS.items() if cls.Options is not None}
    cfg.overrides = overrides
    return validate(cfg)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The validated config: defaults, then the TOML file (if any), then the overrides.

    Per-algorithm `[overrides.NAME]` belong to an experiment: the built-in defaults (no file)
    have the learning rates tuned for them, a file has those it lists and no others.
    """
    data: dict[str, Any] = {"overrides": Config().overrides}
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


def dataset_of(cfg: Config) -> Dataset:
    """The dataset `cfg` names, its loader's options from `[synthetic]` or `[folder]`."""
    options = {"synthetic": cfg.synthetic, "folder": cfg.folder}.get(cfg.dataset)
    return load_dataset(cfg.dataset, cfg.data_dir or None, **(asdict(options) if options else {}))
