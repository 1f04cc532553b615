"""One training round: sample the participants, configure, train them on the executor, screen
the answers and aggregate; `Tally` counts what the round sent and received."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from ..device.executor import Executor, Result
from ..fl import Strategy
from ..fl.payload import Payload, State, Update, state_bytes
from ..fl.strategy import device_seed
from ..fl.validate import rejection
from .experiment import Experiment
from .faults import with_faults
from .sampling import sample_devices

log = logging.getLogger("cadfl")


class Tally:
    """What a round sent and received: bytes, losses, FLOPs and rejections.

    Bytes are per device that was sent a payload (statistics queries count as traffic of the
    round); losses and FLOPs are over the valid updates.
    """

    def __init__(self) -> None:
        self.payloads = self.valid = self.rejected = 0
        self.bytes_down = self.bytes_up = 0
        self.samples = 0
        self.loss_sum = self.flops = 0.0
        self._training = False

    def start_training(self) -> None:
        """From now on payloads are training payloads (before: statistics queries)."""
        self._training = True

    def sent(self, payload: Payload) -> None:
        """Count a payload that went to a device."""
        self.bytes_down += state_bytes(payload.state)
        self.payloads += self._training

    def received(self, update: Update) -> None:
        """Count a valid answer."""
        self.bytes_up += state_bytes(update.state)
        if self._training:
            self.valid += 1
            self.samples += update.num_samples
            self.loss_sum += update.metrics["train_loss"] * update.num_samples
            self.flops += update.metrics["train_flops"]

    def stats(self, communicates: bool, wall_s: float) -> dict[str, float]:
        """The round's metric values."""
        sent = max(1, self.payloads)
        return {"train_loss": self.loss_sum / max(1, self.samples),
                "bytes_down": self.bytes_down / sent if communicates else 0,
                "bytes_up": self.bytes_up / sent if communicates else 0,
                "device_train_flops": self.flops / max(1, self.valid),
                "rejected": self.rejected, "wall_s": wall_s}


def screen(exp: Experiment, rnd: int, results: Iterable[Result], tally: Tally
           ) -> Iterator[tuple[int, Update]]:
    """The valid answers, as they arrive; a payload with no answer or an invalid one is
    logged with the device and the reason, and counted in `tally`."""
    for d, p, u in results:
        tally.sent(p)
        reason = "no answer" if u is None else rejection(
            p, u, exp.label_space, len(exp.data(d)))
        if reason:
            log.warning("round %d: update of device %d rejected: %s", rnd, d, reason)
            tally.rejected += 1
        else:
            tally.received(u)
            yield d, u


def train_round(exp: Experiment, strategy: Strategy, rnd: int, state: State,
                execute: Executor | None = None) -> tuple[State, dict[str, float]]:
    """One round: configure, train every participant, aggregate; returns the new state.

    Payloads are made, trained and folded into the aggregate one device (or one batch of
    devices) at a time. `execute` runs payloads on their devices and yields the updates
    (default: a fresh in-process runtime; the engine passes its own, and the Flower
    adapter one that sends them to Flower nodes).
    """
    cfg = exp.cfg
    start = time.perf_counter()
    execute = execute or exp.runtime()
    # A deployment samples from the devices that can be reached now (a device that brought
    # its own images late is admitted first); in process every device can.
    execute.admit()
    pool = execute.reachable(cfg.devices)
    exp.enter_round(rnd)
    ids = sample_devices(cfg.seed, rnd, [d for d in pool if exp.devices[d].classes],
                         cfg.sampled_per_round())
    strategy.begin_round(rnd, exp.device_map)
    state = strategy.add_classes(state, exp.schedule.model_classes(rnd),
                                 device_seed(cfg.seed, rnd, -2))
    run = with_faults(execute, cfg.faults, cfg.seed, rnd)
    tally = Tally()
    queries = strategy.configure_query(rnd, state, exp.holding())
    if queries:
        replies = dict(screen(exp, rnd, run(sorted(queries.items())), tally))
        if replies:
            state = strategy.aggregate_query(rnd, state, replies)
    tally.start_training()
    updates = screen(exp, rnd, run(strategy.configure_train(rnd, state, ids)), tally)
    merged = strategy.aggregate_train(rnd, state, updates)
    for _ in updates:  # a strategy that stopped early still trains every participant
        pass
    if tally.valid >= min(cfg.min_devices, tally.payloads):
        state = merged
    else:
        log.warning("round %d: %d valid update(s), fewer than min_devices=%d: the global "
                    "state is kept", rnd, tally.valid, cfg.min_devices)
    return state, tally.stats(strategy.communicates, time.perf_counter() - start)
