"""The federated core: payloads, the device side, aggregation, and the algorithms."""

from .central import Central
from .fedavg import FedAvg
from .fedprox import FedProx
from .local import Local
from .strategy import Strategy

ALGORITHMS: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, Local, Central)
}

__all__ = ["ALGORITHMS", "Central", "FedAvg", "FedProx", "Local", "Strategy"]
