"""FedAvg (McMahan et al., AISTATS 2017): every device trains the whole model; the cloud
averages every parameter over the participants, weighted by their sample counts."""

from __future__ import annotations

from collections.abc import Sequence

from .aggregate import Contribution, aggregate
from .payload import Payload, State, Update
from .strategy import LOCAL_PREFIX, Strategy


class FedAvg(Strategy):
    """Federated averaging of the full model."""

    name = "fedavg"

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]
                        ) -> dict[int, Payload]:
        """Every participant gets the whole global model."""
        _, weights = self.global_model(state)
        return {d: Payload(self.spec, self.with_local_stats(d, state, weights),
                           self.device_config(rnd, d)) for d in device_ids}

    def aggregate_train(self, rnd: int, state: State, updates: dict[int, Update]) -> State:
        """Sample-weighted mean of the participants' weights."""
        contributions = [Contribution(updates[d].state, updates[d].num_samples)
                         for d in sorted(updates)]
        merged = aggregate(state, contributions, self.robust)
        local = {k: v for k, v in state.items() if k.startswith(LOCAL_PREFIX)}
        return self.store_local_stats({**merged, **local}, updates)
