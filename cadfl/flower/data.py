"""A device's share of the training data, derived from the experiment config alone.

The same steps as `cadfl.sim.engine.Experiment.setup` (subsample by `data_fraction`, partition
by scheme and seed), but for one partition, so a Flower node needs nothing but the config.
`tests/test_flower.py` checks that every device gets exactly the engine's tensors.
"""

from __future__ import annotations

import torch

from ..data.datasets import Dataset, load_dataset
from ..data.partition import make_partition
from ..fl.central import POOLED
from ..fl.device import DeviceData
from ..sim.config import Config
from ..sim.engine import Experiment, subsample


def partition_indices(cfg: Config, ds: Dataset) -> list[torch.Tensor]:
    """Every device's training-set indices (into the full dataset), as the engine computes."""
    kept = subsample(ds.train_y, cfg.data_fraction, cfg.seed)
    part = make_partition(ds.train_y[kept], cfg.partition.scheme, cfg.devices, cfg.seed,
                          k=cfg.partition.k, alpha=cfg.partition.alpha)
    return [kept[torch.tensor(ix, dtype=torch.long)] for ix in part.indices]


def device_data(cfg: Config, device: int, ds: Dataset | None = None) -> DeviceData:
    """Device `device`'s local data (or the pooled data for `POOLED`)."""
    ds = ds or load_dataset(cfg.dataset, cfg.data_dir or None)
    parts = partition_indices(cfg, ds)
    idx = torch.cat(parts).sort().values if device == POOLED else parts[device]
    return Experiment.data_of(ds, idx)
