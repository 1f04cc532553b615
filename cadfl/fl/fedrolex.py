"""FedRolex (Alam et al., NeurIPS 2022): HeteroFL with a rolling window of channels.

In round t (counted from 1) a device of rate r holds, in every hidden layer of width W, the
channels (t - 1 + i) mod W for i < ceil(r * W) instead of the first ones, so every channel is
trained by small devices in turn. Everything else (rates, label split, aggregation over the
holders of every coordinate) is HeteroFL's (`cadfl.fl.heterofl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .heterofl import HeteroFL, HeteroFLOptions
from .registry import register
from .width import Maps, channel_window


@dataclass
class FedRolexOptions(HeteroFLOptions):
    """FedRolex's settings (`[fedrolex]`): HeteroFL's."""

    algorithm: ClassVar[str] = "fedrolex"


@register
class FedRolex(HeteroFL):
    """HeteroFL whose sub-models take a window of channels that rolls with the round."""

    name = "fedrolex"
    summary = "HeteroFL with a rolling window of channels (NeurIPS 2022)"
    Options = FedRolexOptions

    def kept_channels(self, rnd: int, rate: float) -> Maps:
        """The window of channels starting at channel rnd - 1 (mod each layer's width)."""
        return channel_window(self.spec, rate, offset=rnd - 1)
