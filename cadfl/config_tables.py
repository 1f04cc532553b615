"""The run config's tables below the top level (`[partition]`, `[aggregation]`, `[faults]`,
`[synthetic]`, `[folder]`, `[[context]]`), each a dataclass whose `check` validates its own
values. `[train]` is `cadfl.fl.payload.TrainConfig`, the settings devices train with, which
checks its own the same way; `cadfl.config` puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import check_one_of, check_range


@dataclass
class PartitionConfig:
    """How training data is split over devices."""

    scheme: str = "classes"  # iid | classes | dirichlet
    k: int = 5  # classes per device (scheme "classes")
    alpha: float = 0.5  # Dirichlet concentration (scheme "dirichlet")
    other_fraction: float = 0.0  # out-of-context images per device, as a share of its own

    def check(self) -> None:
        """ValueError naming the setting if one is out of range."""
        check_one_of("partition.scheme", self.scheme, ("iid", "classes", "dirichlet"))
        check_range("partition.k", self.k, 1)
        check_range("partition.alpha", self.alpha, 0, low_open=True)
        check_range("partition.other_fraction", self.other_fraction, 0, 1)


@dataclass
class AggregationConfig:
    """How the cloud combines the holders of each parameter (robust rules for hostile devices)."""

    rule: str = "mean"  # mean | median | trimmed_mean
    trim: float = 0.1  # trimmed_mean: share of the lowest and of the highest values dropped
    clip: float = 0.0  # > 0: scale every update down to at most this L2 norm first

    def check(self) -> None:
        """ValueError naming the setting if one is out of range."""
        check_one_of("aggregation.rule", self.rule, ("mean", "median", "trimmed_mean"))
        check_range("aggregation.trim", self.trim, 0, 0.49)
        check_range("aggregation.clip", self.clip, 0)


@dataclass
class FaultsConfig:
    """Seeded faults injected in simulation (probabilities per device and round)."""

    dropout: float = 0.0  # the device never answers
    straggler: float = 0.0  # the device does only a random part of its local steps
    corrupt: float = 0.0  # the device returns NaNs or a tensor of the wrong shape
    byzantine: float = 0.0  # the device sends its update sign-flipped or scaled by 10

    def check(self) -> None:
        """ValueError naming the setting if one is out of range."""
        for name in ("dropout", "straggler", "corrupt", "byzantine"):
            check_range(f"faults.{name}", getattr(self, name), 0, 1)


@dataclass
class SyntheticConfig:
    """The generated `synthetic` dataset (dataset = "synthetic"): sizes and its own seed."""

    images: int = 200_000  # training images (enough for 10,000 devices x 5 classes)
    test_images: int = 2_000
    classes: int = 10
    channels: int = 1
    size: int = 8  # images are size x size
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the setting if one is out of range."""
        for name in ("images", "test_images", "classes", "channels", "size"):
            check_range(f"synthetic.{name}", getattr(self, name), 1)


@dataclass
class FolderConfig:
    """The `folder` dataset (dataset = "folder", data_dir = DIR): images resized to size x size,
    RGB (channels 3) or grayscale (1), a held-out share of every class as the test split.
    Also how a Flower node reads its own images (node config data-dir)."""

    size: int = 32
    channels: int = 3
    test_fraction: float = 0.2
    seed: int = 0  # draws the held-out images

    def check(self) -> None:
        """ValueError naming the setting if one is out of range."""
        if self.channels not in (1, 3):
            raise ValueError(f"folder.channels: {self.channels} is out of range, allowed "
                             "1 (grayscale) or 3 (RGB)")
        check_range("folder.size", self.size, 1)
        check_range("folder.test_fraction", self.test_fraction, 0, 0.9)
        check_range("folder.seed", self.seed, 0)


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

    def check(self, name: str, rounds: int, devices: int) -> None:
        """ValueError naming the change (`name`, e.g. "context[0]") if it does not fit a run
        of `rounds` rounds over `devices` devices."""
        check_range(f"{name}.round", self.round, 1, rounds)
        for d in self.devices:
            check_range(f"{name}.devices", d, 0, devices - 1)
        for c in (*self.add, *self.remove):
            check_range(f"{name} class", c, 0)
        both = sorted(set(self.add) & set(self.remove))
        if both:
            raise ValueError(f"{name}: classes {both} are both added and removed")
