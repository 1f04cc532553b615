"""Where device models run: the compute device named in the config.

`device = "auto"` takes the first CUDA GPU when torch sees one and the CPU otherwise; "cpu",
"cuda" and "cuda:N" ask for one. A dataset's tensors are moved there once (`to_compute`),
so training and evaluation index and augment them in place, with no per-batch copies.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..data.datasets import Dataset

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """ValueError unless `name` is a compute device's name: auto, cpu, cuda or cuda:N."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device: unknown {name!r}; valid: auto, cpu, cuda, cuda:N")


def resolve_device(name: str) -> torch.device:
    """The torch device for a config's `device` setting; ValueError (saying what is there)
    when it is no device's name, or names a GPU this machine does not have."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device: {name!r} asked for, but torch sees {count} CUDA GPU(s) "
                             "here; use device = \"auto\" or \"cpu\"")
    return device


def to_compute(ds: Dataset, device: torch.device,
               memory_format: torch.memory_format = torch.contiguous_format) -> Dataset:
    """The dataset with its image and label tensors on `device`, images in `memory_format`
    (itself when that changes nothing): batches gathered from them come out in that format,
    with no conversion per batch."""
    if device.type == "cpu" and all(x.is_contiguous(memory_format=memory_format)
                                    for x in (ds.train_x, ds.test_x)):
        return ds
    return replace(ds, train_x=ds.train_x.to(device, memory_format=memory_format),
                   train_y=ds.train_y.to(device),
                   test_x=ds.test_x.to(device, memory_format=memory_format),
                   test_y=ds.test_y.to(device))
