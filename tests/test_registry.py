"""Adding an algorithm is one registered class: no edit of the engine or the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from cadfl.checks import check_range
from cadfl.config import ConfigError, load_config
from cadfl.engine.checkpoint import load_checkpoint
from cadfl.engine.run import run_experiment
from cadfl.fl import ALGORITHMS
from cadfl.fl.fedavg import FedAvg
from cadfl.fl.payload import State
from cadfl.fl.registry import register


@dataclass
class ShrinkOptions:
    factor: float = 0.5

    def check(self, cfg: Any) -> None:
        check_range("shrink.factor", self.factor, 0, 1)


@pytest.fixture
def shrink():
    @register
    class Shrink(FedAvg):
        """FedAvg whose global weights are scaled by `factor` after every round."""

        name = "shrink"
        summary = "a test algorithm"
        Options = ShrinkOptions

        def __init__(self, *args, factor: float = 0.5, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.factor = factor

        def aggregate_train(self, rnd: int, state: State, updates) -> State:
            merged = super().aggregate_train(rnd, state, updates)
            return {k: v * self.factor if v.is_floating_point() else v
                    for k, v in merged.items()}

    yield Shrink
    ALGORITHMS.pop("shrink")


def test_a_registered_algorithm_runs_with_its_own_settings(tmp_path, digits, shrink):
    """One round of "shrink" is FedAvg's round scaled by its own factor, tensor for tensor."""
    cfg = load_config(None, ['algorithms=["fedavg", "shrink"]', "rounds=1", "devices=2",
                             "overrides={}", "shrink.factor=0.25"])  # one learning rate
    assert cfg.options_of("shrink").factor == 0.25
    run_experiment(cfg, tmp_path, quiet=True, dataset=digits)
    shrunk, _ = load_checkpoint(tmp_path / "checkpoints", "shrink")
    fedavg, _ = load_checkpoint(tmp_path / "checkpoints", "fedavg")
    assert list(shrunk) == list(fedavg)
    for k, v in fedavg.items():
        assert torch.equal(shrunk[k], v * 0.25 if v.is_floating_point() else v), k
    with pytest.raises(ConfigError, match=r"shrink.factor: 2.0 is out of range"):
        load_config(None, ['algorithms=["shrink"]', "shrink.factor=2.0"])


def test_every_algorithm_says_what_it_is():
    for name, cls in ALGORITHMS.items():
        assert cls.name == name and cls.summary, name
        assert cls.family in ("global", "personalised", "sub-model", "grouped", "cad",
                              "reference"), name
        assert cls.judged_by in ("global_acc", "context_acc", "both"), name


