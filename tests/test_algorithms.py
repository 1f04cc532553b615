"""Every registered algorithm runs: on the embedded digits default, on CIFAR-10, and on
Flower's simulation engine; each reports the metric it is judged by."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cadfl.config import load_config
from cadfl.engine.run import run_experiment
from cadfl.fl import ALGORITHMS

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = sorted(ALGORITHMS)


def check_lines(lines: list[dict], rounds: int) -> None:
    assert sorted({m["algorithm"] for m in lines}) == ALL
    for m in lines:
        if m["round"] != rounds:
            continue
        cls = ALGORITHMS[m["algorithm"]]
        assert m["context_acc"] is not None and 0 <= m["context_acc"] <= 1, m["algorithm"]
        has_global = cls.judged_by != "context_acc"
        assert (m["global_acc"] is not None) == has_global, m["algorithm"]
        assert m["device_train_flops"] > 0 and m["rejected"] == 0, m["algorithm"]


def test_every_algorithm_runs_on_the_embedded_default(tmp_path, digits):
    cfg = load_config(None, ["rounds=2", "devices=4", f"algorithms={ALL!r}".replace("'", '"')])
    lines = run_experiment(cfg, tmp_path, quiet=True, dataset=digits)
    check_lines(lines, 2)
    by = {m["algorithm"]: m for m in lines if m["round"] == 2}
    assert by["fedavg"]["global_acc"] > 0.3  # 10 classes: chance is 0.1


@pytest.mark.skipif(not (Path(os.environ.get("CADFL_DATA", "/nonexistent"))
                         / "cifar-10-batches-py").is_dir(),
                    reason="CIFAR-10 not prepared (CADFL_DATA; see README)")
def test_every_algorithm_runs_on_cifar10(tmp_path):
    cfg = load_config(None, ['dataset="cifar10"', 'model="fl_cnn"', "devices=4", "rounds=1",
                             "data_fraction=0.02", "test_fraction=0.05",
                             f"algorithms={ALL!r}".replace("'", '"')])
    check_lines(run_experiment(cfg, tmp_path, quiet=True), 1)


@pytest.mark.slow
def test_every_algorithm_runs_on_flower_simulation_as_on_the_own_engine(tmp_path, digits):
    pytest.importorskip("flwr")
    from cadfl.flower.simulation import run_flower_simulation

    cfg = load_config(None, ["rounds=2", "devices=3", "data_fraction=0.5",
                             f"algorithms={ALL!r}".replace("'", '"')])
    own = run_experiment(cfg, tmp_path / "own", quiet=True, dataset=digits)
    sim = run_flower_simulation(cfg, tmp_path / "sim")
    check_lines(sim, 2)

    def strip(lines: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "wall_s"} for m in lines]

    assert strip(sim) == strip(own)
