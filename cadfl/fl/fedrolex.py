"""FedRolex (Alam et al., NeurIPS 2022): HeteroFL with a rolling window of channels.

In round t (counted from 1) a device of rate r holds, in every hidden layer of width W, the
channels (t - 1 + i) mod W for i < ceil(r * W) instead of the first ones, so every channel is
trained by small devices in turn. Everything else (rates, label split, aggregation over the
holders of every coordinate) is HeteroFL's (`cadfl.fl.heterofl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..cad.width import Maps, channel_window
from .heterofl import HeteroFL, HeteroFLOptions
from .registry import register


@dataclass
class FedRolexOptions(HeteroFLOptions):
    """FedRolex's settings (`[fedrolex]`): HeteroFL's."""

    algorithm: ClassVar[str] = "fedrolex"

    def check(self, cfg: Any) -> None:
        """HeteroFL's checks; and batch-norm statistics kept on the device would belong to
        the channels of an earlier window."""
        super().check(cfg)
        if cfg.bn == "keep_local" and self.algorithm in cfg.algorithms:
            raise ValueError("bn: 'keep_local' does not fit fedrolex (a device's channels "
                             "change every round); use 'average'")


@register
class FedRolex(HeteroFL):
    """HeteroFL whose sub-models take a window of channels that rolls with the round."""

    name = "fedrolex"
    summary = "HeteroFL with a rolling window of channels (NeurIPS 2022)"
    Options = FedRolexOptions

    def kept_channels(self, rnd: int, rate: float) -> Maps:
        """The window of channels starting at channel rnd - 1 (mod each layer's width)."""
        return channel_window(self.spec, rate, offset=rnd - 1)
