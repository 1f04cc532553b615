"""How a run draws its data and devices: class-balanced subsamples, out-of-context images,
the partition of data that come split by device, and each round's participants (seeded)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..data.partition import Partition


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
