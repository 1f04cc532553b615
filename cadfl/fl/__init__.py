"""The federated core: payloads, the device side, aggregation, and the algorithms.

Every algorithm is one module that registers its strategy (`registry.register`); importing
it here is what puts it in `ALGORITHMS`.
"""

from . import (  # noqa: F401  (registration)
    cad,
    central,
    ditto,
    fed2,
    fedavg,
    fedper,
    fedprox,
    fedrep,
    fedrolex,
    heterofl,
    local,
    scaffold,
)
from .registry import ALGORITHMS, register
from .strategy import Setting, Strategy

__all__ = ["ALGORITHMS", "Setting", "Strategy", "register"]
