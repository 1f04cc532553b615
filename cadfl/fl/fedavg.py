"""FedAvg (McMahan et al., AISTATS 2017): every device trains the whole model; the cloud
averages every parameter over the participants, weighted by their sample counts."""

from __future__ import annotations

from collections.abc import Sequence

from .payload import State
from .registry import register
from .strategy import Payloads, Strategy


@register
class FedAvg(Strategy):
    """Federated averaging of the full model (the default `aggregate_train`)."""

    name = "fedavg"
    summary = "federated averaging of the whole model, weighted by sample counts"

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]) -> Payloads:
        """Every participant gets the whole global model."""
        for d in device_ids:
            yield d, self.payload(rnd, d, self.spec, state)
