"""The simulation engine and the baseline algorithms on the bundled digits data.

Each check is against something computed independently in the test: plain local training,
per-device accuracies from the saved weights, an uninterrupted run, a second run.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cadfl.cli import main
from cadfl.config import DEMO, Config, load_config
from cadfl.device.score import predict
from cadfl.device.store import DeviceStore, with_kept
from cadfl.device.train import DeviceData, train_local
from cadfl.engine.checkpoint import load_checkpoint
from cadfl.engine.evaluate import evaluate
from cadfl.engine.experiment import Experiment
from cadfl.engine.rounds import train_round
from cadfl.engine.run import run_experiment
from cadfl.engine.sampling import sample_devices
from cadfl.fl.aggregate import is_bn_stat
from cadfl.fl.payload import Payload
from cadfl.fl.strategy import device_seed

KEYS = ["round", "algorithm", "global_acc", "context_acc", "eval_devices", "test_loss",
        "train_loss", "bytes_down", "bytes_up", "device_train_flops", "wall_s", "rejected",
        "class_acc", "others_reject", "others_in_acc", "context_open_acc", "precision"]


pytestmark = pytest.mark.usefixtures("one_thread")


def small(*overrides: str) -> Config:
    """A quick digits config: 4 devices x 5 classes, half the data, 4 rounds, two algorithms."""
    return load_config(None, ["devices=4", "rounds=4", "data_fraction=0.5",
                              'algorithms=["fedavg", "local"]', *overrides])


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock times."""
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in lines]


def assert_same_checkpoints(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        state_a, record_a = load_checkpoint(a / "checkpoints", name)
        state_b, record_b = load_checkpoint(b / "checkpoints", name)
        assert record_a == record_b
        assert set(state_a) == set(state_b)
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name}: {key}"


def test_test_fraction_evaluates_that_share_of_every_class(digits):
    exp = Experiment.setup(small("test_fraction=0.25"), digits)
    counts = torch.bincount(exp.dataset.test_y, minlength=10)
    expected = torch.bincount(digits.test_y, minlength=10).mul(0.25).ceil().long()
    assert torch.equal(counts, expected)
    assert len(digits.test_y) > len(exp.dataset.test_y)  # the fixture itself is untouched
    assert torch.equal(exp.dataset.train_y, digits.train_y)


def own_class_accuracy(spec, weights, ds, classes) -> float:
    """A device's accuracy on the test images of its classes, argmax over its classes only."""
    mask = torch.isin(ds.test_y, torch.tensor(classes))
    logits = predict(spec, weights, ds.test_x[mask], ds.mean, ds.std)
    pred = torch.tensor(classes)[logits[:, list(classes)].argmax(1)]
    return (pred == ds.test_y[mask]).double().mean().item()


class Interrupt(Exception):
    pass


def stop_after(algorithm: str, rnd: int):
    def on_round(line: dict) -> None:
        if (line["algorithm"], line["round"]) == (algorithm, rnd):
            raise Interrupt
    return on_round


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, digits) -> Path:
    """The small config run once, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    run_experiment(small(), out, quiet=True, dataset=digits)
    return out


# FedAvg, FedProx


def test_fedavg_one_device_one_round_is_plain_local_training(digits):
    cfg = load_config(None, ["devices=1", "partition.scheme=iid", "rounds=1",
                             'algorithms=["fedavg"]'])
    exp = Experiment.setup(cfg, digits)
    strategy = exp.strategy("fedavg")
    state, _ = train_round(exp, strategy, 1, strategy.initial_state(exp.init))

    # The same training done by hand: the whole training set, the initial weights, the
    # device's seed for round 1.
    data = DeviceData(digits.train_x, digits.train_y, digits.num_classes, digits.mean,
                      digits.std, digits.crop_padding, digits.flip)
    config = replace(exp.train_config(cfg.for_algorithm("fedavg")),
                     seed=device_seed(cfg.seed, 1, 0))
    payload = Payload(exp.spec, {k: v.clone() for k, v in exp.init.items()}, config)
    update = train_local(payload, data)

    assert update.num_samples == len(digits.train_y)
    assert set(state) == set(update.state)
    for key, value in update.state.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key
    assert not torch.equal(state["conv1.weight"], exp.init["conv1.weight"])


def test_fedprox_with_mu_zero_is_fedavg(digits):
    exp = Experiment.setup(small("fedprox.mu=0"), digits)
    states = {}
    for name in ("fedavg", "fedprox"):
        strategy = exp.strategy(name)
        state = strategy.initial_state(exp.init)
        for rnd in (1, 2):
            state, _ = train_round(exp, strategy, rnd, state)
        states[name] = state
    assert set(states["fedavg"]) == set(states["fedprox"])
    for key in states["fedavg"]:
        assert torch.equal(states["fedavg"][key], states["fedprox"][key]), key


def distance(state: dict, anchor: dict) -> float:
    """L2 distance over trainable weights (batch-norm running statistics left out)."""
    return math.sqrt(sum(((state[k].double() - anchor[k].double()) ** 2).sum().item()
                         for k in anchor if not is_bn_stat(k)))


def test_fedprox_keeps_devices_closer_to_the_global_model(digits):
    exp = Experiment.setup(small("fedprox.mu=1.0"), digits)
    fedavg, fedprox = exp.strategy("fedavg"), exp.strategy("fedprox")
    ids = [d.id for d in exp.devices]
    avg_payloads = dict(fedavg.configure_train(1, fedavg.initial_state(exp.init), ids))
    prox_payloads = dict(fedprox.configure_train(1, fedprox.initial_state(exp.init), ids))
    for d in ids:
        assert prox_payloads[d].config.objective_args == (("mu", 1.0),)
        assert not avg_payloads[d].config.objective
        moved_avg = distance(train_local(avg_payloads[d], exp.data(d)).state, exp.init)
        moved_prox = distance(train_local(prox_payloads[d], exp.data(d)).state, exp.init)
        assert 0 < moved_prox < moved_avg, (d, moved_prox, moved_avg)

    after_avg, _ = train_round(exp, fedavg, 1, fedavg.initial_state(exp.init))
    after_prox, _ = train_round(exp, fedprox, 1, fedprox.initial_state(exp.init))
    assert not torch.equal(after_avg["conv1.weight"], after_prox["conv1.weight"])


# Resume, determinism


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, digits, reference_run):
    cfg = small()
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_experiment(cfg, out, quiet=True, dataset=digits, on_round=stop_after("local", 2))
    done = metrics(out)
    assert [(m["algorithm"], m["round"]) for m in done][-3:] == [
        ("fedavg", 4), ("local", 1), ("local", 2)]
    # A crash between writing a metric line and its checkpoint leaves a line the checkpoint
    # does not cover: resume must drop it and redo the round.
    stale = {**done[-1], "round": 3, "context_acc": 0.123, "wall_s": 1.0}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(stale) + "\n")

    lines = run_experiment(cfg, out, resume=True, quiet=True, dataset=digits)

    assert metrics(out) == metrics(reference_run)
    assert [{k: v for k, v in m.items() if k != "wall_s"} for m in lines] == metrics(out)
    assert_same_checkpoints(out, reference_run, cfg.algorithms)
    assert (out / "summary.md").exists() and (out / "curves.png").exists()


def test_cli_resume_continues_a_run(tmp_path, digits, reference_run):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_experiment(small(), out, quiet=True, dataset=digits, on_round=stop_after("fedavg", 3))
    assert not (out / "checkpoints" / "local.json").exists()

    # --data-dir may go with --resume (the data may have moved); digits ignores it.
    assert main(["run", "--resume", str(out), "--data-dir", str(tmp_path), "--quiet"]) == 0

    assert metrics(out) == metrics(reference_run)
    assert_same_checkpoints(out, reference_run, small().algorithms)
    assert load_config(out / "config.toml").data_dir == str(tmp_path)


def test_cli_resume_refuses_a_config_and_a_non_run(tmp_path, capsys, reference_run):
    config = tmp_path / "c.toml"
    config.write_text("rounds = 2\n")
    assert main(["run", str(config), "--resume", str(reference_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", "--resume", str(reference_run), "--set", "rounds=9"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "config.toml" in capsys.readouterr().err
    # A finished run directory is not overwritten by a fresh run either.
    assert main(["run", "--out", str(reference_run), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_same_seed_same_metrics_other_seed_differs(tmp_path, digits, reference_run):
    run_experiment(small(), tmp_path / "again", quiet=True, dataset=digits)
    assert metrics(tmp_path / "again") == metrics(reference_run)
    assert_same_checkpoints(tmp_path / "again", reference_run, small().algorithms)

    run_experiment(small("seed=1"), tmp_path / "seed1", quiet=True, dataset=digits)
    other = metrics(tmp_path / "seed1")
    assert [(m["algorithm"], m["round"]) for m in other] == [
        (m["algorithm"], m["round"]) for m in metrics(reference_run)]
    assert other != metrics(reference_run)


# What a round reports


def test_metrics_lines_eval_thinning_bytes_and_context_accuracy(tmp_path, digits):
    cfg = small("rounds=3", "eval_every=2", "sample=0.5",
                'algorithms=["fedavg", "local", "central"]')
    out = tmp_path / "run"
    run_experiment(cfg, out, quiet=True, dataset=digits)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["algorithm"], m["round"]) for m in lines] == [
        (a, r) for a in cfg.algorithms for r in (1, 2, 3)]
    for m in lines:
        assert list(m) == KEYS
        assert m["wall_s"] > 0 and m["device_train_flops"] > 0 and m["train_loss"] > 0
        evaluated = m["round"] in (2, 3)  # every 2nd round, and always the last one
        assert (m["context_acc"] is not None) == evaluated
        has_global = evaluated and m["algorithm"] != "local"
        assert (m["global_acc"] is not None) == has_global
        assert (m["test_loss"] is not None) == has_global

    exp = Experiment.setup(cfg, digits)
    model_bytes = sum(t.numel() * t.element_size() for t in exp.init.values())
    by = {(m["algorithm"], m["round"]): m for m in lines}
    for rnd in (1, 2, 3):
        assert by["fedavg", rnd]["bytes_down"] == model_bytes
        assert by["fedavg", rnd]["bytes_up"] == model_bytes
        for name in ("local", "central"):
            assert by[name, rnd]["bytes_down"] == 0 and by[name, rnd]["bytes_up"] == 0

    # Only half the devices train each round, but context accuracy covers all of them.
    assert len(sample_devices(cfg.seed, 3, range(cfg.devices), cfg.sampled_per_round())) == 2
    for name in cfg.algorithms:
        state, record = load_checkpoint(out / "checkpoints", name)
        assert record["round"] == 3
        strategy = exp.strategy(name)
        store = DeviceStore(out / "devices" / name)  # what each device kept (local: its model)
        models = {d: replace(p, state=with_kept(p.spec, p.state, p.keep, store.get(d)))
                  for d, p in strategy.configure_evaluate(3, state, [d.id for d in exp.devices])}
        accs = [own_class_accuracy(models[d.id].spec, models[d.id].state, digits, d.classes)
                for d in exp.devices]
        assert by[name, 3]["eval_devices"] == len(exp.devices)
        assert by[name, 3]["context_acc"] == pytest.approx(sum(accs) / len(accs), abs=1e-6)
        if name != "local":
            logits = predict(exp.spec, state, digits.test_x, digits.mean, digits.std)
            acc = (logits.argmax(1) == digits.test_y).double().mean().item()
            assert by[name, 3]["global_acc"] == pytest.approx(acc, abs=1e-6)
            loss = F.cross_entropy(logits, digits.test_y).item()
            assert by[name, 3]["test_loss"] == pytest.approx(loss, rel=1e-5)
    kept = DeviceStore(out / "devices" / "local")
    assert not torch.equal(kept.get(0)["conv1.weight"], kept.get(1)["conv1.weight"])
    # The devices' models live on the devices; the cloud holds only the shared initial weights.
    assert load_checkpoint(out / "checkpoints", "local")[0].keys() == exp.init.keys()


def test_keep_local_bn_scores_each_device_with_its_own_statistics(digits):
    # 3 local epochs, so that the devices' statistics move far enough to change predictions.
    exp = Experiment.setup(small("bn=keep_local", "sample=0.5", "train.epochs=3"), digits)
    strategy, runtime = exp.strategy("fedavg"), exp.runtime()
    state, _ = train_round(exp, strategy, 1, strategy.initial_state(exp.init), runtime)
    participants = sample_devices(exp.cfg.seed, 1, range(exp.cfg.devices), 2)
    key = "bn1.running_mean"
    accs, accs_global = [], []
    for d in exp.devices:
        kept = runtime.store.get(d.id)
        assert (key in kept) == (d.id in participants)
        own = {k: kept.get(k, v) for k, v in state.items()}
        accs.append(own_class_accuracy(exp.spec, own, digits, d.classes))
        accs_global.append(own_class_accuracy(exp.spec, state, digits, d.classes))
    assert not torch.equal(runtime.store.get(participants[0])[key], state[key])
    evals = evaluate(exp, strategy, 1, state, runtime)
    assert evals["context_acc"] == pytest.approx(sum(accs) / len(accs), abs=1e-6)
    assert accs != accs_global  # otherwise this test could not tell the two apart


# The embedded default


def test_embedded_demo_runs_via_cli_with_no_config(tmp_path):
    # The demo's first 12 rounds (its wall time, about two minutes for 40 on 2 cores, is
    # reported in the README, not asserted: this machine is shared and noisy).
    out = tmp_path / "demo"
    assert main(["run", "--out", str(out), "--quiet", "--set", "rounds=12"]) == 0

    for name in ("config.toml", "partition.json", "metrics.jsonl", "summary.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    demo = load_config(DEMO, ["rounds=12"])
    assert load_config(out / "config.toml") == demo
    for name in demo.algorithms:
        assert load_checkpoint(out / "checkpoints", name)[1]["round"] == 12
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 12 * len(demo.algorithms)
    fedavg = [m["global_acc"] for m in lines
              if m["algorithm"] == "fedavg" and m["global_acc"] is not None]
    assert len(fedavg) == 12 // demo.eval_every and fedavg[-1] > fedavg[0]
    assert fedavg[-1] > 0.3, fedavg  # 10 classes: chance is 0.1
    assert "fedavg" in (out / "summary.md").read_text()
    # A device holds 2 classes (chance 0.5 on its own images): in 12 rounds every algorithm
    # learns them above chance, local too, though a device has trained once or twice by then.
    for algo in demo.algorithms:
        assert max(m["context_acc"] or 0 for m in lines if m["algorithm"] == algo) > 0.6, algo


def test_open_context_accuracy_takes_the_argmax_over_every_output_on_own_class_images():
    from cadfl.device.score import context_scores
    from cadfl.models import get_model

    spec = get_model("digits_cnn", num_classes=4)  # outputs for classes 0..3
    # Device classes (1, 2). Rows: own-class images 1, 2, 2, 1 and one image of class 3.
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0],   # 1 -> 1: right both ways
                           [9.0, 0.0, 2.0, 0.0],   # 2 -> 0 open (wrong), 2 restricted (right)
                           [0.0, 1.0, 3.0, 0.0],   # 2 -> 2: right both ways
                           [0.0, 1.0, 2.0, 7.0],   # 1 -> 3 open (wrong), 2 restricted (wrong)
                           [0.0, 0.0, 0.0, 9.0]])  # class 3: not the device's, not scored
    y = torch.tensor([1, 2, 2, 1, 3])
    acc, reject, inside, opened = context_scores(logits, y, spec, (1, 2), other=None)
    assert (acc, opened) == (0.75, 0.5)
    assert math.isnan(reject) and math.isnan(inside)


def test_open_accuracy_is_over_the_outputs_each_devices_model_has(tmp_path, digits):
    # A CAD device's sub-model answers among its classes only: open = within its classes.
    # A FedAvg device holds the whole model: its open argmax may pick any class.
    cfg = load_config(None, ["devices=4", "rounds=2", "data_fraction=0.5",
                             'algorithms=["cad", "fedavg"]'])
    lines = run_experiment(cfg, tmp_path, quiet=True, dataset=digits)
    for m in lines:
        if m["algorithm"] == "cad":
            assert m["context_open_acc"] == pytest.approx(m["context_acc"])
        else:
            assert m["context_open_acc"] < m["context_acc"]
