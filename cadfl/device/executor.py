"""The executor protocol, and the runtime: payloads in, updates out, on this process's compute
device.

`Executor` is all the engine asks of whatever runs payloads on devices (this module's
`Runtime`, Flower's executor, a test's fake). The `Runtime` is the device side of the
simulation. For each job (device id, payload) it puts the device's kept tensors into the
payload, runs the payload's task on the device's data, stores what the device keeps and
drops what it keeps private from the update. Jobs arrive as
an iterator and results leave as one, so a round never holds more than a few payloads and
updates at once, however many devices take part. With `batch_devices` > 1, up to that many
consecutive jobs whose models have the same shape are trained together (`batched.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from itertools import islice

from ..fl.payload import PERSONAL, Payload, State, Update, model_part
from .store import DeviceStore, kept_entries, with_kept
from .train import DeviceData, run_task

Job = tuple[int, Payload]
Result = tuple[int, Payload, Update | None]
RunJobs = Callable[[Iterable[Job]], Iterator[Result]]
Scores = tuple[float, float, float, float]  # context_acc, others_reject, others_in_acc,
# context_open_acc


class Executor(ABC):
    """Runs the engine's payloads on the devices.

    Every round the engine calls `begin_round(algorithm, rnd)`, then `admit()` (devices that
    became ready since the last round join), samples the participants from `reachable(n)`,
    and runs the round's jobs by calling the executor. Where devices keep their own state out
    of the engine's reach (`scores_devices`), the engine has them score their own models
    with `score`.
    """

    scores_devices: bool = False

    def begin_round(self, algorithm: str, rnd: int) -> None:
        """The engine starts round `rnd` of `algorithm` (default: nothing to prepare)."""
        return

    def admit(self) -> None:
        """Take in devices that became ready since the last round (default: none can)."""
        return

    def reachable(self, devices: int) -> list[int]:
        """The devices (of 0..devices-1) a round can sample now; changes nothing
        (default: all)."""
        return list(range(devices))

    @abstractmethod
    def __call__(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """Run the jobs; results in job order, update None for a device that gave none."""

    def score(self, jobs: Iterable[Job]) -> Iterator[tuple[int, Scores]]:
        """The `Scores` of the devices' own models, scored where they are, for the devices
        that answered (only executors with `scores_devices`)."""
        raise NotImplementedError(f"{type(self).__name__} does not score on its devices")


class Runtime(Executor):
    """Runs jobs one after another (or in same-shape batches) on local data.

    `data_of(d)` gives device d's data (on the compute device); `store` keeps what devices
    keep between rounds; `task` runs one prepared payload (PyTorch's `run_task`, or e.g.
    ExecuTorch's `train_executorch`; batches of devices always train in PyTorch).
    """

    def __init__(self, data_of: Callable[[int], DeviceData], store: DeviceStore | None = None,
                 batch_devices: int = 1,
                 task: Callable[[Payload, DeviceData], Update] = run_task) -> None:
        self.data_of = data_of
        self.store = store if store is not None else DeviceStore()
        self.batch_devices = batch_devices
        self.task = task

    def prepare(self, device: int, payload: Payload) -> Payload:
        """The payload the device actually trains: with its own kept tensors."""
        if not payload.keep:
            return payload
        return replace(payload, state=with_kept(payload.spec, payload.state, payload.keep,
                                                self.store.get(device)))

    def own_state(self, device: int, payload: Payload) -> State:
        """The weights of the model the device predicts with: the payload's model with the
        device's kept tensors in place, and its personal copies in place of theirs (all of
        them: Ditto's personal model; some layers: CAD's personal paths)."""
        state = self.prepare(device, payload).state
        return {**model_part(state), **model_part(state, PERSONAL)}

    def finish(self, device: int, payload: Payload, update: Update) -> Update:
        """Store what the device keeps; return the update without its private tensors."""
        if payload.task != "train" or not payload.keep:
            return update
        self.store.put(device, kept_entries(payload.spec, update.state, payload.keep))
        if not payload.private:
            return update
        shared = set(payload.returned_keys())
        return replace(update, state={k: v for k, v in update.state.items() if k in shared})

    def run(self, device: int, payload: Payload) -> Update:
        """One job, start to end."""
        prepared = self.prepare(device, payload)
        return self.finish(device, prepared, self.task(prepared, self.data_of(device)))

    def __call__(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """Results in job order, produced as the jobs are pulled."""
        jobs = iter(jobs)
        if self.batch_devices <= 1:
            for device, payload in jobs:
                yield device, payload, self.run(device, payload)
            return
        while window := list(islice(jobs, self.batch_devices)):
            yield from self._run_window(window)

    def _run_window(self, window: list[Job]) -> Iterator[Result]:
        from .batched import batch_key, train_batched

        prepared = [(d, self.prepare(d, p)) for d, p in window]
        groups: dict[tuple, list[int]] = {}
        for i, (_, p) in enumerate(prepared):
            key = batch_key(p)
            groups.setdefault(("single", i) if key is None else key, []).append(i)
        updates: dict[int, Update] = {}
        for members in groups.values():
            if len(members) == 1:
                d, p = prepared[members[0]]
                updates[members[0]] = run_task(p, self.data_of(d))
                continue
            trained = train_batched([(prepared[i][1], self.data_of(prepared[i][0]))
                                     for i in members])
            updates.update(zip(members, trained, strict=True))
        for i, (d, payload) in enumerate(window):
            yield d, payload, self.finish(d, prepared[i][1], updates[i])
