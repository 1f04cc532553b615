"""Seeded faults for the simulation: devices that never answer, stragglers, corrupt updates,
and Byzantine devices that send a sign-flipped or scaled update.

Every draw comes from (seed, round, device), so a run with faults is as reproducible as one
without, and exercises the update validation (`cadfl.fl.validate`) the same way every time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np
import torch

from ..config_tables import FaultsConfig
from ..device.executor import Job, Result, RunJobs
from ..fl.payload import Payload, Update


def corrupt(update: Update, rng: np.random.Generator) -> Update:
    """The update with NaN weights or (as often) one tensor of the wrong shape."""
    state = dict(update.state)
    if rng.random() < 0.5:
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                 for k, v in state.items()}
    else:
        key = max(state, key=lambda k: state[k].numel())
        state[key] = state[key].flatten()[:-1]
    return replace(update, state=state)


def byzantine(payload: Payload, update: Update, rng: np.random.Generator) -> Update:
    """The update with its change to the weights sign-flipped or multiplied by 10: finite and
    well-formed, so validation cannot catch it; only robust aggregation can."""
    factor = -1.0 if rng.random() < 0.5 else 10.0
    state = {k: (payload.state[k] + factor * (v - payload.state[k])
                 if v.is_floating_point() and k in payload.state else v)
             for k, v in update.state.items()}
    return replace(update, state=state)


def with_faults(execute: RunJobs, faults: FaultsConfig, seed: int, rnd: int) -> RunJobs:
    """`execute` with devices that drop out, straggle or corrupt their answers."""
    if not (faults.dropout or faults.straggler or faults.corrupt or faults.byzantine):
        return execute

    def run(jobs: Iterable[Job]) -> Iterator[Result]:
        for d, p in jobs:
            draw = np.random.default_rng([seed, rnd, d, 0xFA17])
            dropout, straggler, fraction = draw.random(3)
            if dropout < faults.dropout:
                yield d, p, None  # never answers
                continue
            if straggler < faults.straggler and p.task == "train":
                p = replace(p, config=replace(p.config, fraction=fraction))
            for _, sent, u in execute([(d, p)]):
                bad, hostile = draw.random(2)
                if u is not None and hostile < faults.byzantine and sent.task == "train":
                    u = byzantine(sent, u, draw)
                if u is not None and bad < faults.corrupt:
                    u = corrupt(u, draw)
                yield d, sent, u

    return run
