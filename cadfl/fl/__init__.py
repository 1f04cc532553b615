"""The federated core: payloads, the device side, aggregation, and the algorithms."""

from .cad import CAD, Fed2
from .central import Central
from .fedavg import FedAvg
from .fedprox import FedProx
from .local import Local
from .strategy import Strategy

ALGORITHMS: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (CAD, Fed2, FedAvg, FedProx, Local, Central)
}

__all__ = ["ALGORITHMS", "CAD", "Fed2", "Central", "FedAvg", "FedProx", "Local", "Strategy"]
