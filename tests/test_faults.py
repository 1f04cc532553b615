"""Seeded faults in simulation: dropouts, stragglers and corrupt updates, reproducibly, and
always caught by the update validation."""

from pathlib import Path

import pytest
import torch

from cadfl.config import ConfigError, load_config
from cadfl.engine.checkpoint import load_checkpoint
from cadfl.engine.run import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = ["devices=6", "rounds=3", 'algorithms=["fedavg","cad"]', "data_fraction=0.5"]


def _run(tmp_path: Path, name: str, *faults: str) -> list[dict]:
    return run_experiment(load_config(None, [*BASE, *faults]), tmp_path / name, quiet=True)


def _strip(lines):
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in lines]


def test_corrupt_updates_are_all_rejected_reproducibly_and_never_reach_the_state(tmp_path):
    lines = _run(tmp_path, "a", "faults.corrupt=0.5")
    assert sum(m["rejected"] for m in lines) > 0
    assert _strip(lines) == _strip(_run(tmp_path, "b", "faults.corrupt=0.5"))
    for algo in ("fedavg", "cad"):
        state, _ = load_checkpoint(tmp_path / "a" / "checkpoints", algo)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_devices_that_never_answer_are_counted_and_a_silent_round_keeps_the_state(tmp_path):
    lines = _run(tmp_path, "drop", "faults.dropout=1.0")
    assert all(m["rejected"] == 6 for m in lines)
    clean = _run(tmp_path, "clean")
    first = {m["algorithm"]: m for m in clean if m["round"] == 1}
    assert all(m["global_acc"] < first[m["algorithm"]]["global_acc"] for m in lines
               if m["round"] == 3)  # nothing was learnt


def test_stragglers_do_fewer_steps(tmp_path):
    slow = _run(tmp_path, "slow", "faults.straggler=1.0")
    clean = _run(tmp_path, "clean")
    for s, c in zip(slow, clean, strict=True):
        assert s["device_train_flops"] < c["device_train_flops"]
        assert s["rejected"] == 0


def test_fault_probabilities_outside_0_1_are_refused():
    with pytest.raises(ConfigError, match="faults.corrupt"):
        load_config(None, ["faults.corrupt=1.5"])
