"""Split a training set's indices across devices: iid, k classes per device, or Dirichlet.

Every scheme returns a `Partition` whose per-device index sets are disjoint, cover the whole
training set, are non-empty, and depend only on (labels, arguments, seed).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SCHEMES = ("iid", "classes", "dirichlet")
# A saved partition may also be "own": each device's own images (Flower nodes with their data).
SAVED_SCHEMES = (*SCHEMES, "own")
SUMMARY_ROWS = 30


class PartitionError(ValueError):
    """An impossible partition request or a malformed partition file; the message says which."""


@dataclass
class Partition:
    """Which training indices each device holds.

    `indices[d]` is device d's sorted list of training-set indices; `class_counts[d][c]` is
    how many of them have label c. `params` holds the scheme's arguments, e.g. {"k": 5} or
    {"alpha": 0.5}.
    """

    scheme: str
    seed: int
    num_classes: int
    params: dict
    indices: list[list[int]]
    class_counts: list[list[int]]

    @property
    def num_devices(self) -> int:
        """Number of devices."""
        return len(self.indices)

    def classes(self, d: int) -> list[int]:
        """Sorted classes device `d` holds at least one image of."""
        return [c for c, n in enumerate(self.class_counts[d]) if n > 0]

    def check_labels(self, labels: np.ndarray | torch.Tensor) -> None:
        """Raise PartitionError unless this partition fits `labels` exactly.

        Guards against pairing a saved partition with a different training set: every index
        must be used once and the recorded class counts must match the labels.
        """
        y = _as_labels(labels)
        flat = np.concatenate([np.asarray(i, dtype=np.int64) for i in self.indices])
        if len(flat) != len(y) or not np.array_equal(np.sort(flat), np.arange(len(y))):
            raise PartitionError(f"partition does not cover the {len(y)} training samples "
                                 f"exactly once (it lists {len(flat)} indices)")
        for d, idx in enumerate(self.indices):
            counts = np.bincount(y[idx], minlength=self.num_classes).tolist()
            if counts != self.class_counts[d]:
                raise PartitionError(f"device {d}: class counts {self.class_counts[d]} do not "
                                     f"match the labels ({counts}); wrong dataset?")

    def save(self, path: str | Path) -> None:
        """Write the partition as JSON (devices listed in order, with indices and counts)."""
        doc = {
            "scheme": self.scheme,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "params": self.params,
            "devices": [
                {"id": d, "indices": idx, "class_counts": counts}
                for d, (idx, counts) in enumerate(zip(self.indices, self.class_counts, strict=True))
            ],
        }
        Path(path).write_text(json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> "Partition":
        """Read a partition written by `save`; PartitionError naming the file if malformed."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise PartitionError(f"cannot read partition file {path}: {e}") from e
        try:
            return cls._from_doc(doc)
        except KeyError as e:
            raise PartitionError(f"malformed partition file {path}: missing key {e}") from e
        except (TypeError, ValueError) as e:
            raise PartitionError(f"malformed partition file {path}: {e}") from e

    @classmethod
    def _from_doc(cls, doc: dict) -> "Partition":
        def ints(v: object, what: str) -> list[int]:
            if not isinstance(v, list) or not all(type(i) is int and i >= 0 for i in v):
                raise ValueError(f"{what} must be a list of non-negative integers")
            return v

        if not isinstance(doc, dict):
            raise ValueError("top level must be a JSON object")
        scheme, seed, num_classes, params = (doc["scheme"], doc["seed"], doc["num_classes"],
                                             doc["params"])
        if scheme not in SAVED_SCHEMES:
            raise ValueError(f"scheme {scheme!r} is not one of {', '.join(SAVED_SCHEMES)}")
        if type(seed) is not int or type(num_classes) is not int or num_classes < 1:
            raise ValueError("seed must be an integer and num_classes a positive integer")
        if not isinstance(params, dict) or not isinstance(doc["devices"], list):
            raise ValueError("params must be an object and devices a list")
        indices, class_counts = [], []
        for d, dev in enumerate(doc["devices"]):
            if dev["id"] != d:
                raise ValueError(f"device {d} has id {dev['id']!r}; ids must be 0, 1, 2, ...")
            idx = ints(dev["indices"], f"device {d} indices")
            counts = ints(dev["class_counts"], f"device {d} class_counts")
            if len(counts) != num_classes or sum(counts) != len(idx):
                raise ValueError(f"device {d} class_counts must have {num_classes} entries "
                                 f"summing to its {len(idx)} indices")
            if idx != sorted(set(idx)):
                raise ValueError(f"device {d} indices must be sorted and unique")
            indices.append(idx)
            class_counts.append(counts)
        if not indices:
            raise ValueError("no devices")
        if sum(map(len, indices)) != len(set().union(*indices)):
            raise ValueError("devices share indices")
        return cls(scheme, seed, num_classes, params, indices, class_counts)

    def summary(self, class_names: list[str] | None = None) -> str:
        """A printable table of each device's sample count and held classes (the first
        `SUMMARY_ROWS` devices), then totals."""

        def name(c: int) -> str:
            return class_names[c] if class_names else str(c)

        args = " ".join(f"{k}={v}" for k, v in self.params.items())
        sizes = [len(i) for i in self.indices]
        lines = [
            f"partition {self.scheme} {args}".rstrip() + f" seed={self.seed}: "
            f"{self.num_devices} devices, {self.num_classes} classes, {sum(sizes)} samples",
            f"{'device':>6}  {'samples':>7}  {'#cls':>4}  class:count",
        ]
        for d in range(min(self.num_devices, SUMMARY_ROWS)):
            held = " ".join(f"{name(c)}:{self.class_counts[d][c]}" for c in self.classes(d))
            lines.append(f"{d:>6}  {sizes[d]:>7}  {len(self.classes(d)):>4}  {held}")
        if self.num_devices > SUMMARY_ROWS:
            lines.append(f"{'...':>6}  ({self.num_devices - SUMMARY_ROWS} more devices: see "
                         "partition.json)")
        totals = np.sum(self.class_counts, axis=0)
        holders = (np.asarray(self.class_counts) > 0).sum(axis=0)
        lines.append(f"{'total':>6}  {sum(sizes):>7}  {'':>4}  " + " ".join(
            f"{name(c)}:{totals[c]}" for c in range(self.num_classes)))
        lines.append("devices per class: " + " ".join(
            f"{name(c)}:{holders[c]}" for c in range(self.num_classes)))
        lines.append(f"samples per device: min {min(sizes)}, max {max(sizes)}, "
                     f"mean {sum(sizes) / len(sizes):.1f}")
        return "\n".join(lines)


def _as_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) == 0 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise PartitionError("labels must be a non-empty 1-d array of non-negative integers")
    return y.astype(np.int64)


def _check_devices(num_devices: int, n: int) -> None:
    if num_devices < 1:
        raise PartitionError(f"num_devices must be >= 1, got {num_devices}")
    if num_devices > n:
        raise PartitionError(f"num_devices={num_devices} is more than the {n} training "
                             f"samples; every device needs at least one (use <= {n})")


def _build(scheme: str, seed: int, y: np.ndarray, params: dict,
           parts: list[np.ndarray]) -> Partition:
    num_classes = int(y.max()) + 1
    indices = [np.sort(p) for p in parts]
    return Partition(
        scheme=scheme,
        seed=seed,
        num_classes=num_classes,
        params=params,
        indices=[i.tolist() for i in indices],
        class_counts=[np.bincount(y[i], minlength=num_classes).tolist() for i in indices],
    )


def partition_iid(labels: np.ndarray | torch.Tensor, num_devices: int, seed: int) -> Partition:
    """Shuffle all indices and deal them into `num_devices` parts of equal size (within 1)."""
    y = _as_labels(labels)
    _check_devices(num_devices, len(y))
    rng = np.random.default_rng(seed)
    return _build("iid", seed, y, {}, np.array_split(rng.permutation(len(y)), num_devices))


def _class_sets(class_sizes: np.ndarray, num_devices: int, k: int,
                rng: np.random.Generator) -> np.ndarray:
    """Pick k distinct classes per device, each class held by floor or ceil of D*k/C devices.

    Method (sample and repair): the D*k slots are filled with every class floor(D*k/C) times
    plus one extra slot for each of the D*k mod C largest classes (ties broken at random),
    shuffled, and dealt k per device. Then, while device d holds some class c twice, one
    copy of c is swapped with a random slot of a random device e that lacks c, among the
    slots whose class is new to d or duplicated in e. Every device lacking c has such a slot
    and every swap removes a duplicate, so this ends after at most D*k swaps, and it keeps
    each class's holder count. Returns a bool (num_devices, num_classes) holding matrix.
    """
    num_classes = len(class_sizes)
    slots = num_devices * k
    reps = np.full(num_classes, slots // num_classes)
    by_size = np.lexsort((rng.random(num_classes), -class_sizes))
    reps[by_size[: slots % num_classes]] += 1
    sets = rng.permutation(np.repeat(np.arange(num_classes), reps)).reshape(num_devices, k)
    held = np.zeros((num_devices, num_classes), dtype=np.int64)  # copies of class c on d
    np.add.at(held, (np.arange(num_devices)[:, None], sets), 1)
    for d in range(num_devices):
        while (held[d] > 1).any():
            c = np.flatnonzero(held[d] > 1)[0]
            j = np.flatnonzero(sets[d] == c)[0]
            e = rng.choice(np.flatnonzero(held[:, c] == 0))
            o = sets[e]
            m = rng.choice(np.flatnonzero((held[d, o] == 0) | (held[e, o] > 1)))
            swapped = o[m]
            sets[d, j], sets[e, m] = swapped, c
            held[d, c] -= 1
            held[d, swapped] += 1
            held[e, swapped] -= 1
            held[e, c] += 1
    return held > 0


def partition_classes(labels: np.ndarray | torch.Tensor, num_devices: int, k: int,
                      seed: int) -> Partition:
    """Give each device exactly `k` distinct classes, every class to at least one device.

    Class sets are random but balanced (see `_class_sets`); each class's images are shuffled
    and split evenly (sizes within 1) among the devices holding it. The CAD paper's setting
    is 10 devices x 5 classes of CIFAR-10.
    """
    y = _as_labels(labels)
    _check_devices(num_devices, len(y))
    sizes = np.bincount(y)
    num_classes = len(sizes)
    if not 1 <= k <= num_classes:
        raise PartitionError(f"k must be in 1..{num_classes} (the number of classes), got {k}")
    if num_devices * k < num_classes:
        raise PartitionError(f"num_devices * k = {num_devices} * {k} < {num_classes} classes: "
                             f"some class would be held by no device; use k >= "
                             f"{-(-num_classes // num_devices)} or more devices")
    rng = np.random.default_rng(seed)
    held = _class_sets(sizes, num_devices, k, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for c in range(num_classes):
        holders = np.flatnonzero(held[:, c])
        if sizes[c] < len(holders):
            raise PartitionError(f"class {c} has {sizes[c]} images but {len(holders)} devices "
                                 f"must share it; use fewer devices or a smaller k")
        shares = np.array_split(rng.permutation(np.flatnonzero(y == c)), len(holders))
        for d, share in zip(holders, shares, strict=True):
            parts[d].append(share)
    return _build("classes", seed, y, {"k": k}, [np.concatenate(p) for p in parts])


def partition_dirichlet(labels: np.ndarray | torch.Tensor, num_devices: int, alpha: float,
                        seed: int) -> Partition:
    """Split each class over devices in proportions drawn from Dirichlet(alpha, ..., alpha).

    Small alpha gives few classes per device, large alpha approaches iid. A device left
    empty by the draw gets one random sample moved to it from the currently largest device,
    so every device holds at least one sample.
    """
    y = _as_labels(labels)
    _check_devices(num_devices, len(y))
    if not alpha > 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for c in range(int(y.max()) + 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        counts = rng.multinomial(len(idx), rng.dirichlet(np.full(num_devices, float(alpha))))
        for d, share in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[d].extend(share.tolist())
    for d in range(num_devices):
        if not parts[d]:
            largest = max(range(num_devices), key=lambda e: len(parts[e]))
            parts[d].append(parts[largest].pop(rng.integers(len(parts[largest]))))
    return _build("dirichlet", seed, y, {"alpha": float(alpha)},
                  [np.asarray(p, dtype=np.int64) for p in parts])


def hold_out(part: Partition, labels: np.ndarray | torch.Tensor, fraction: float, seed: int
             ) -> tuple[Partition, np.ndarray]:
    """Split a share of every device's images off as its validation data: of each class a
    device holds n > 1 images of, ceil(fraction * n) (at most n - 1), drawn seeded per device.
    Returns the partition of what stays for training and the sorted validation indices.
    `part`'s indices index `labels`."""
    y = _as_labels(labels)
    train, held = [], []
    for d, idx in enumerate(part.indices):
        idx = np.asarray(idx, dtype=np.int64)
        rng = np.random.default_rng([seed, 4, d])
        out = np.zeros(len(idx), dtype=bool)
        for c in np.unique(y[idx]):
            mine = np.flatnonzero(y[idx] == c)
            if len(mine) > 1:
                take = min(len(mine) - 1, math.ceil(fraction * len(mine)))
                out[rng.choice(mine, take, replace=False)] = True
        train.append(idx[~out])
        held.append(idx[out])
    kept = _build(part.scheme, part.seed, y, {**part.params, "validation_fraction": fraction},
                  train)
    kept.num_classes = part.num_classes
    kept.class_counts = [np.bincount(y[i], minlength=part.num_classes).tolist()
                         for i in train]
    return kept, np.sort(np.concatenate(held))


def make_partition(labels: np.ndarray | torch.Tensor, scheme: str, num_devices: int, seed: int,
                   k: int | None = None, alpha: float | None = None) -> Partition:
    """Partition by scheme name: "iid", "classes" (needs k) or "dirichlet" (needs alpha).

    Arguments the chosen scheme does not use are ignored.
    """
    if scheme == "iid":
        return partition_iid(labels, num_devices, seed)
    if scheme == "classes":
        if k is None:
            raise PartitionError("scheme 'classes' needs k (classes per device)")
        return partition_classes(labels, num_devices, k, seed)
    if scheme == "dirichlet":
        if alpha is None:
            raise PartitionError("scheme 'dirichlet' needs alpha (Dirichlet concentration > 0)")
        return partition_dirichlet(labels, num_devices, alpha, seed)
    raise PartitionError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def share_classes(part: Partition, labels: np.ndarray | torch.Tensor,
                  extra: dict[int, set[int]], seed: int) -> Partition:
    """`part` where device d also holds images of every class in `extra[d]`.

    For each class c that some device gains, the images of c are pooled from its holders and
    dealt again, in equal shares (within 1), to the holders and the devices gaining it, so the
    index sets stay disjoint and cover the same images. `params["shared"]` records the gains.
    """
    y = _as_labels(labels)
    parts = [np.asarray(i, dtype=np.int64) for i in part.indices]
    rng = np.random.default_rng([seed, 1])
    for c in sorted(set().union(*extra.values()) if extra else ()):
        gaining = [d for d in sorted(extra) if c in extra[d] and not part.class_counts[d][c]]
        if not gaining:
            continue
        holders = [d for d in range(part.num_devices) if part.class_counts[d][c]]
        pool = np.concatenate([parts[d][y[parts[d]] == c] for d in holders] or [[]]).astype(int)
        takers = holders + gaining
        if len(pool) < len(takers):
            raise PartitionError(f"class {c} has {len(pool)} training images, too few to give "
                                 f"one to each of devices {takers}")
        shares = np.array_split(rng.permutation(pool), len(takers))
        for d, share in zip(takers, shares, strict=True):
            parts[d] = np.concatenate([parts[d][y[parts[d]] != c], share])
    params = {**part.params, "shared": {str(d): sorted(extra[d]) for d in sorted(extra)}}
    return _build(part.scheme, part.seed, y, params, parts)
