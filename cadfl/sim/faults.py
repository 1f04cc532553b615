"""Seeded faults for the simulation: devices that never answer, stragglers, corrupt updates.

Every draw comes from (seed, round, device), so a run with faults is as reproducible as one
without, and exercises the update validation (`cadfl.fl.validate`) the same way every time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from ..fl.payload import Payload, Update
from .config import FaultsConfig

Executor = Callable[[dict[int, Payload]], dict[int, Update]]


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


def with_faults(execute: Executor, faults: FaultsConfig, seed: int, rnd: int) -> Executor:
    """`execute` with devices that drop out, straggle or corrupt their answers."""
    if not (faults.dropout or faults.straggler or faults.corrupt):
        return execute

    def run(payloads: dict[int, Payload]) -> dict[int, Update]:
        draws = {d: np.random.default_rng([seed, rnd, d, 0xFA17]) for d in payloads}
        sent = {}
        for d, p in sorted(payloads.items()):
            dropout, straggler, fraction = draws[d].random(3)
            if dropout < faults.dropout:
                continue  # never answers
            if straggler < faults.straggler and p.task == "train":
                p = replace(p, config=replace(p.config, fraction=fraction))
            sent[d] = p
        answers = execute(sent)
        return {d: corrupt(u, draws[d]) if draws[d].random() < faults.corrupt else u
                for d, u in answers.items()}

    return run
