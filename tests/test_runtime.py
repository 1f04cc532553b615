"""The device runtime in the engine: compute device, streaming rounds, explicit structure,
bytes per device, sampled evaluation, and the synthetic dataset for scale."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from cadfl.config import ConfigError, load_config
from cadfl.data.datasets import load_dataset
from cadfl.device.compute import resolve_device
from cadfl.device.executor import Executor
from cadfl.engine.checkpoint import load_checkpoint
from cadfl.engine.evaluate import evaluation_devices
from cadfl.engine.experiment import Experiment
from cadfl.engine.rounds import train_round
from cadfl.engine.run import run_experiment
from cadfl.fl.cad import CAD

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small(*overrides: str):
    return load_config(None, ["devices=4", "rounds=3", "data_fraction=0.5",
                              'algorithms=["cad", "fedavg"]', *overrides])


def lines_of(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(s).items() if k != "wall_s"}
            for s in (out / "metrics.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    pass


def test_device_auto_is_the_cpu_here_and_gives_identical_metrics(tmp_path, digits):
    if torch.cuda.is_available():
        pytest.skip("auto means CUDA on this machine")
    assert resolve_device("auto") == torch.device("cpu")
    run_experiment(small("device=\"cpu\""), tmp_path / "cpu", quiet=True, dataset=digits)
    run_experiment(small("device=\"auto\""), tmp_path / "auto", quiet=True, dataset=digits)
    assert lines_of(tmp_path / "cpu") == lines_of(tmp_path / "auto")


def test_a_device_that_is_not_here_stops_before_any_work():
    with pytest.raises(ConfigError, match="device: unknown 'gpu'"):
        load_config(None, ['device="gpu"'])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees 0 CUDA GPU"):
            Experiment.setup(load_config(None, ['device="cuda:0"']))


@CUDA
def test_cuda_runs_land_within_noise_of_the_cpu_run(tmp_path, digits):
    cfg = ["rounds=5", "devices=4"]
    run_experiment(small(*cfg, 'device="cpu"'), tmp_path / "cpu", quiet=True, dataset=digits)
    run_experiment(small(*cfg, 'device="cuda"'), tmp_path / "gpu", quiet=True, dataset=digits)
    cpu, gpu = lines_of(tmp_path / "cpu"), lines_of(tmp_path / "gpu")
    for a, b in zip(cpu, gpu, strict=True):
        assert a["bytes_down"] == b["bytes_down"] and a["device_train_flops"] == \
            b["device_train_flops"]
    for algo in ("cad", "fedavg"):
        last = [m for m in cpu if m["algorithm"] == algo][-1]["global_acc"]
        last_gpu = [m for m in gpu if m["algorithm"] == algo][-1]["global_acc"]
        assert abs(last - last_gpu) < 0.05, (algo, last, last_gpu)


def test_a_round_holds_one_update_at_a_time(digits):
    exp = Experiment.setup(small("devices=6"), digits)
    strategy, runtime = exp.strategy("cad"), exp.runtime()
    alive: list[weakref.ref] = []
    most = 0

    class Watching(Executor):
        def __call__(self, jobs):
            nonlocal most
            for d, p, u in runtime(jobs):
                gc.collect()
                most = max(most, sum(r() is not None for r in alive))
                alive.append(weakref.ref(u))
                yield d, p, u

    train_round(exp, strategy, 1, strategy.initial_state(exp.init), Watching())
    assert len(alive) == 6
    assert most <= 1  # every earlier update was folded in and freed before the next trained


def test_bytes_per_device_count_every_device_sent_a_payload(tmp_path, digits):
    cfg = small("faults.dropout=0.5", "rounds=2", 'algorithms=["fedavg"]')
    lines = run_experiment(cfg, tmp_path, quiet=True, dataset=digits)
    exp = Experiment.setup(cfg, digits)
    model_bytes = sum(t.numel() * t.element_size() for t in exp.init.values())
    assert sum(m["rejected"] for m in lines) > 0  # some devices dropped out
    for m in lines:
        assert m["bytes_down"] == model_bytes  # not inflated by the devices that dropped


def test_eval_devices_scores_a_seeded_sample_of_device_models(tmp_path, digits):
    cfg = small('algorithms=["local"]', "devices=6", "eval_devices=2", "rounds=2")
    lines = run_experiment(cfg, tmp_path, quiet=True, dataset=digits)
    assert [m["eval_devices"] for m in lines] == [2, 2]
    exp, again = Experiment.setup(cfg, digits), Experiment.setup(cfg, digits)
    assert evaluation_devices(exp, 2) == evaluation_devices(again, 2)  # seeded, not random
    assert len(set(evaluation_devices(exp, 2))) == 2
    assert {tuple(evaluation_devices(exp, r)) for r in range(1, 9)} != \
        {tuple(evaluation_devices(exp, 2))}  # a new sample every round


def test_resume_reads_cads_structure_from_the_checkpoint(tmp_path, digits, monkeypatch):
    cfg = small('algorithms=["cad"]', "rounds=4", 'cad.assign="activation"',
                "cad.warmup_rounds=1", 'cad.depth="auto"', "cad.selectivity_threshold=0.2")
    run_experiment(cfg, tmp_path / "ref", quiet=True, dataset=digits)

    def stop(line):
        if line["round"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(cfg, tmp_path / "run", quiet=True, dataset=digits, on_round=stop)
    record = load_checkpoint(tmp_path / "run" / "checkpoints", "cad")[1]
    assert record["structure"]["decoupled"] and record["structure"]["decoupling"]["depth"] >= 0

    # The resumed CAD takes up exactly the record's structure (the activation-assigned
    # decoupling, which its tensors' shapes alone could not tell apart from a prior one).
    taken = []
    restore = CAD.restore
    monkeypatch.setattr(CAD, "restore", lambda self, s: (taken.append(s), restore(self, s)))
    run_experiment(cfg, tmp_path / "run", resume=True, quiet=True, dataset=digits)
    assert taken == [record["structure"]]
    assert lines_of(tmp_path / "run") == lines_of(tmp_path / "ref")


def test_synthetic_data_are_seeded_learnable_and_sized_as_asked():
    a = load_dataset("synthetic", images=500, test_images=50, classes=4, channels=3, size=16)
    b = load_dataset("synthetic", images=500, test_images=50, classes=4, channels=3, size=16)
    assert a.train_x.shape == (500, 3, 16, 16) and a.test_x.shape == (50, 3, 16, 16)
    assert torch.equal(a.train_x, b.train_x) and a.num_classes == 4
    assert torch.bincount(a.train_y).tolist() == [125] * 4
    # Nearest class mean separates the classes: there is something to learn.
    means = torch.stack([a.train_x[a.train_y == c].float().mean(0) for c in range(4)])
    dist = ((a.test_x.float()[:, None] - means[None]) ** 2).flatten(2).sum(2)
    assert (dist.argmin(1) == a.test_y).float().mean() > 0.9
    other = load_dataset("synthetic", images=500, test_images=50, classes=4, channels=3,
                         size=16, seed=1)
    assert not torch.equal(a.train_x, other.train_x)


def test_a_thousand_devices_on_the_synthetic_defaults_run(tmp_path):
    cfg = load_config(None, ['dataset="synthetic"', "devices=1000", "sample=10", "rounds=2",
                             'algorithms=["cad", "fedavg", "local"]', "eval_devices=20",
                             "synthetic.images=20000"])
    lines = run_experiment(cfg, tmp_path, quiet=True)
    assert len(lines) == 6
    by = {m["algorithm"]: m for m in lines if m["round"] == 2}
    assert by["local"]["eval_devices"] == 20 and by["fedavg"]["eval_devices"] == 1000
    assert 0 <= by["fedavg"]["global_acc"] <= 1 and by["cad"]["bytes_down"] > 0
    # Local models of the devices that trained are on disk or in memory, nothing else.
    assert len(list((tmp_path / "devices" / "local").glob("*.safetensors"))) <= 20


def test_batched_devices_give_the_sequential_runs_metrics(tmp_path, digits):
    cfg = ["rounds=2", "devices=6", "sample=4", 'algorithms=["cad", "fedavg", "local"]',
           'bn="keep_local"']
    run_experiment(small(*cfg), tmp_path / "seq", quiet=True, dataset=digits)
    run_experiment(small(*cfg, "batch_devices=4"), tmp_path / "batch", quiet=True,
                   dataset=digits)
    for a, b in zip(lines_of(tmp_path / "seq"), lines_of(tmp_path / "batch"), strict=True):
        for key in ("global_acc", "context_acc", "train_loss"):
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], abs=2e-3), (a["algorithm"], key)
        assert (a["bytes_down"], a["device_train_flops"]) == \
            (b["bytes_down"], b["device_train_flops"])


def test_validation_split_is_held_out_of_training_and_scored_instead_of_test(digits):
    cfg = small("validation_fraction=0.2", 'eval_split="validation"')
    exp = Experiment.setup(cfg, digits)
    trained = torch.cat([torch.tensor(i) for i in exp.partition.indices])
    assert len(exp.dataset.test_y) > 0
    full = Experiment.setup(small(), digits)
    assert len(trained) + len(exp.dataset.test_y) == sum(map(len, full.partition.indices))
    # The scored images are exactly the devices' images that none of them trains on.
    before = torch.cat([torch.tensor(i) for i in full.partition.indices])
    held = before[~torch.isin(before, trained)]
    assert torch.equal(exp.dataset.test_y, digits.train_y[held.sort().values])
    assert torch.equal(exp.dataset.test_x, digits.train_x[held.sort().values])
    with pytest.raises(ConfigError, match="needs validation_fraction"):
        load_config(None, ['eval_split="validation"'])
